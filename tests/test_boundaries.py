"""Stage ownership: stages depend on eaglecache.formats and the root, not on each other; only precompute/,
serve/ and data's regeneration import vLLM; only train/ imports DeepSpeed; no module imports another's private name."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ["eaglecache", "data", "precompute", "train", "serve"]
VLLM_ALLOWED = ("precompute/", "serve/", "data/regenerate.py")
DEEPSPEED_ALLOWED = ("train/",)


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


STAGES = ("data", "precompute", "train", "serve")
# The cross-stage imports that stay, each with why. Anything else a stage needs of another is a format
# (eaglecache/formats/) or root code (eaglecache/*.py).
ALLOWED_CROSS_STAGE = {
    # held-out prompts and the demo's conversations come from the ShareGPT reader (the one exception)
    ("serve/prompts.py", "eaglecache.data.sharegpt"),
    ("serve/demo.py", "eaglecache.data.sharegpt"),
}
# Root glue that names stages: the config schema composes each stage's section, the command line registers
# each stage's commands, the embedded tiny target's corpus is ShareGPT read by data's reader.
ALLOWED_ROOT_TO_STAGE = {
    ("eaglecache/config.py", "eaglecache.data.config"), ("eaglecache/config.py", "eaglecache.precompute.config"),
    ("eaglecache/config.py", "eaglecache.train.config"), ("eaglecache/config.py", "eaglecache.serve.config"),
    ("eaglecache/cli.py", "eaglecache.data"), ("eaglecache/cli.py", "eaglecache.precompute"),
    ("eaglecache/cli.py", "eaglecache.train"), ("eaglecache/cli.py", "eaglecache.serve"),
    ("eaglecache/tiny_target/corpus.py", "eaglecache.data.sharegpt"),
}


def _eaglecache_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every absolute ``eaglecache.*`` import, lazy ones inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(module, names) for module, names in found if module.split(".")[0] == "eaglecache"]


def _owner(rel: str) -> str:
    """The stage a file belongs to, "formats", or "root"."""
    top = rel.split("/")[0]
    if top in STAGES:
        return top
    return "formats" if rel.startswith("eaglecache/formats/") else "root"


def cross_stage_imports(files) -> list[str]:
    """What breaks the layering: a stage importing another stage, a format importing any stage, root code
    importing a stage outside the glue list, anyone importing a private (``_name``) of another module."""
    offenders = []
    for rel, path in files:
        owner = _owner(rel)
        for module, names in _eaglecache_imports(path):
            parts = module.split(".")
            other = parts[1] if len(parts) > 1 and parts[1] in STAGES else None
            if other and other != owner:
                allowed = ALLOWED_ROOT_TO_STAGE if owner == "root" else ALLOWED_CROSS_STAGE
                if (rel, module) not in allowed:
                    offenders.append(f"{rel} imports {module}")
            offenders += [f"{rel} imports the private {name} of {module}" for name in names
                          if name.startswith("_") and not name.endswith("__")]  # __version__ is public
    return offenders


def test_stages_depend_on_formats_and_the_root_not_on_each_other():
    assert not cross_stage_imports(_python_files()), cross_stage_imports(_python_files())


def test_the_boundary_check_catches_a_cross_stage_and_a_private_import(tmp_path):
    (tmp_path / "train").mkdir()
    bad = tmp_path / "train" / "x.py"
    bad.write_text("def f():\n    from eaglecache.serve.export import export\n"
                   "from eaglecache.formats.run import _hidden\nfrom eaglecache.formats.draft import DraftArch\n")
    assert sorted(cross_stage_imports([("train/x.py", bad)])) == [
        "train/x.py imports eaglecache.serve.export", "train/x.py imports the private _hidden of eaglecache.formats.run"]
    fmt = tmp_path / "f.py"
    fmt.write_text("import eaglecache.train.draft\n")
    assert cross_stage_imports([("eaglecache/formats/f.py", fmt)]) == ["eaglecache/formats/f.py imports eaglecache.train.draft"]


def _python_files():
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path


def test_vllm_and_deepspeed_stay_in_their_stages():
    offenders = []
    for rel, path in _python_files():
        roots = _imported_roots(path)
        if "vllm" in roots and not rel.startswith(VLLM_ALLOWED):
            offenders.append(f"{rel} imports vllm")
        if "deepspeed" in roots and not rel.startswith(DEEPSPEED_ALLOWED):
            offenders.append(f"{rel} imports deepspeed")
    assert not offenders, offenders


def test_every_module_says_what_it_owns_and_stays_small():
    problems = []
    for rel, path in _python_files():
        text = path.read_text()
        tree = ast.parse(text)
        if not ast.get_docstring(tree):
            problems.append(f"{rel}: no module docstring")
        if text.count("\n") > 600:
            problems.append(f"{rel}: over 600 lines")
    assert not problems, problems
