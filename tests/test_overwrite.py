"""No command replaces an output it did not write, unless told to with --overwrite.

Every command that writes a file or directory is tried on an --output holding unrelated files: it
must refuse with one line naming the path (exit 2) and leave every byte there. With --overwrite
the cheap commands (data prepare, data vocab) really run and replace it; the others are shown to
get past the refusal (the unrelated files are gone, and the run stops at its next check, a missing
input, so no engine starts). Their own earlier outputs are accepted without the flag: that is
resume (precompute, train, ablate) and is checked on real outputs by their own tests.
"""

import json
from pathlib import Path

import pytest

from eaglecache.cli import main
from eaglecache.outputs import ablation, claim_output, train_run

MISSING = "/nonexistent/eaglecache-input"

# command words, the extra arguments that make its command line complete (inputs that do not exist,
# so nothing expensive can start), and whether its output is a file rather than a directory
COMMANDS = {
    "data prepare": (["--input", MISSING], "dir"),
    "data regenerate": (["--input", MISSING], "file"),
    "data vocab": (["--data", MISSING], "file"),
    "precompute": (["--data", MISSING], "dir"),
    "train": (["--cache", MISSING], "dir"),
    "ablate": (["--cache", MISSING, "--grid", "train.lr=[1e-4]"], "dir"),
    "export": (["--run-dir", MISSING], "dir"),
    "bench": (["--draft", MISSING, "--prompts", "humaneval"], "dir"),
    "demo": (["train.launcher.num_nodes=2"], "dir"),
}


def foreign_dir(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / "notes.txt").write_bytes(b"my own notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("existing", ["unrelated directory", "unrelated file"])
def test_an_output_the_command_did_not_write_is_refused_untouched(command, existing, tmp_path, capsys):
    extra, _ = COMMANDS[command]
    out = tmp_path / "out"
    before = foreign_dir(out) if existing == "unrelated directory" else (out.write_text("keep me\n"), snapshot(out))[1]
    rc, err = run([*command.split(), *extra, "--output", str(out)], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        f"error: {out} exists and was not written by `eaglecache {command}` (use --overwrite to replace it)"]
    assert snapshot(out) == before


@pytest.mark.parametrize("command", list(COMMANDS))
def test_overwrite_gets_past_the_refusal_and_removes_the_unrelated_files(command, tmp_path, capsys):
    extra, _ = COMMANDS[command]
    out = tmp_path / "out"
    foreign_dir(out)
    rc, err = run([*command.split(), *extra, "--output", str(out), "--overwrite"], capsys)
    assert rc == 2 and "was not written by" not in err  # it stopped at its next check (the missing input)
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not (out / "notes.txt").exists() and not (out / "sub").exists()


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    path = tmp_path_factory.mktemp("conversations") / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                    {"role": "assistant", "content": f"answer {i} " * 5}]}) + "\n"
                            for i in range(6)))
    return path


@pytest.mark.parametrize("existing", ["unrelated directory", "unrelated file", "its own data set"])
def test_data_prepare_replaces_only_what_it_was_allowed_to(existing, conversations, tiny_target, tmp_path, capsys):
    from eaglecache.formats.dataset import open_dataset

    out = tmp_path / "data"
    argv = ["data", "prepare", "--input", str(conversations), "--output", str(out), f"target.path={tiny_target}"]
    if existing == "unrelated directory":
        foreign_dir(out)
    elif existing == "unrelated file":
        out.write_text("keep me\n")
    else:
        assert run(argv, capsys)[0] == 0
    before = snapshot(out)
    rc, err = run(argv, capsys)
    if existing == "its own data set":  # prepared again in place, as before, without --overwrite
        assert rc == 0 and len(open_dataset(out)) == 6
        return
    assert rc == 2 and "use --overwrite" in err and snapshot(out) == before
    assert run(argv + ["--overwrite"], capsys)[0] == 0
    assert len(open_dataset(out)) == 6 and not (out / "notes.txt").exists()


def test_data_vocab_replaces_an_unrelated_file_only_with_overwrite(tiny_dataset, tiny_target, tmp_path, capsys):
    from eaglecache.formats.vocab import read_vocab

    out = tmp_path / "vocab.safetensors"
    out.write_text("not a vocab\n")
    argv = ["data", "vocab", "--input", str(tiny_dataset), "--output", str(out), f"target.path={tiny_target}",
            "data.draft_vocab_size=64"]
    rc, err = run(argv, capsys)
    assert rc == 2 and "use --overwrite" in err and out.read_text() == "not a vocab\n"
    assert run(argv + ["--overwrite"], capsys)[0] == 0
    assert len(read_vocab(out)[0]) == 64
    assert run(argv, capsys)[0] == 0  # its own mapping: rebuilt in place without the flag


def test_resumable_outputs_are_recognised_as_the_commands_own(tmp_path):
    run_dir = tmp_path / "ablate" / "ttt_length-1"
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train: {}\n")
    (run_dir / "metrics.jsonl").write_text("")
    assert train_run(run_dir) and ablation(run_dir.parent)
    assert claim_output(run_dir, False, "train", train_run) == run_dir and (run_dir / "checkpoints").is_dir()
    (run_dir / "notes.txt").write_text("mine")  # one unknown name: no longer provably a run
    assert not train_run(run_dir) and not ablation(run_dir.parent)


def test_overwrite_never_removes_the_current_directory(tmp_path, monkeypatch, capsys):
    foreign_dir(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    rc, err = run(["data", "prepare", "--input", MISSING, "--output", ".", "--overwrite"], capsys)
    assert rc == 2 and "will not remove" in err and (tmp_path / "work" / "notes.txt").is_file()


def test_target_build_refuses_an_unrelated_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    before = foreign_dir(out)  # with --overwrite it would be removed and a 10-minute build would start
    rc, err = run(["target", "build", "--output", str(out)], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {out} exists and was not written by `eaglecache target build` (use --overwrite to replace it)"]
    assert snapshot(out) == before
