"""Stage ownership: only precompute/, serve/ and data's regeneration import vLLM; only train/ imports DeepSpeed."""

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
