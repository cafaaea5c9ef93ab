"""The config schema and the command line: clear errors, exit code 2, dotted overrides."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from eaglecache.cli import build_parser, main
from eaglecache.config import DEFAULT_CONFIG, load_config, with_overrides
from eaglecache.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_default_config_loads_and_overrides_apply():
    config = load_config(None, ["train.lr=2e-4", "target.tensor_parallel_size=4",
                                "precompute.aux_layer_ids=[1,2,3]"])
    assert config.train.lr == 2e-4
    assert config.target.tensor_parallel_size == 4
    assert config.precompute.aux_layer_ids == [1, 2, 3]
    # a stage may run the target with another TP size than the others (the seed's override)
    staged = load_config(None, ["precompute.tensor_parallel_size=4"])
    assert staged.target.vllm_engine_args(staged.precompute.tensor_parallel_size)["tensor_parallel_size"] == 4
    assert staged.target.vllm_engine_args(staged.serve.tensor_parallel_size)["tensor_parallel_size"] == 1
    assert load_config(None).train.lr != 2e-4


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_minimax_config_holds_the_seed_settings():
    config = load_config(REPO / "configs" / "minimax_m3" / "config.yaml")
    assert config.target.tensor_parallel_size == 4
    assert config.precompute.aux_layer_ids == [2, 30, 57]
    assert config.train.ttt_length == 7 and config.train.lr == 1e-4
    assert config.train.warmup_ratio == 0.02 and config.train.max_grad_norm == 1.0
    assert config.train.global_batch_size == 32 and config.train.gradient_checkpointing
    assert config.data.max_seq_length == 32768 and config.serve.num_speculative_tokens == 3
    assert config.target.weights_prefix == "language_model."


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.nope=1"], "unknown config key: train.nope"),
        (["train.lr=abc"], "config key train.lr"),
        (["train.ttt_length=0"], "config key train.ttt_length"),
        (["bogus"], "expected section.key=value"),
        (["train.lr.x=1"], "train.lr"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError, match="train.lr"):
        load_config(bad)


def test_cli_bad_config_is_one_line_and_exit_2(capsys):
    assert main(["train", "--output", "x", "train.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.nope" in err and "\n" not in err


def test_overrides_after_a_multi_value_flag_are_not_taken_as_inputs():
    args = build_parser().parse_args(["data", "prepare", "--output", "o", "--input", "a.json", "data.max_seq_length=64"])
    from eaglecache.cli import _collect_overrides

    _collect_overrides(args)
    assert args.input == ["a.json"] and args.overrides == ["data.max_seq_length=64"]


def _leaf_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, child in sub.choices.items():
        nested = [a for a in child._actions if getattr(a, "choices", None) and a.dest.endswith("_command")]
        if nested:
            for leaf in nested[0].choices:
                yield [name, leaf]
        else:
            yield [name]


def test_help_of_every_command_works():
    commands = list(_leaf_commands())
    assert ["train"] in commands and ["data", "prepare"] in commands and ["cache", "verify"] in commands
    for command in [[]] + commands:
        out = subprocess.run([sys.executable, "-m", "eaglecache.cli", *command, "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (command, out.stderr)
        assert "usage: eaglecache" in out.stdout


def test_default_config_is_the_tiny_one():
    assert DEFAULT_CONFIG.name == "tiny.yaml" and DEFAULT_CONFIG.is_file()


def test_config_show_prints_resolved_values_with_their_docs(capsys):
    assert main(["config", "show", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("lr:"))
    assert "0.0003" in line and "# Peak AdamW learning rate." in line
    assert "  launcher:" in out and "num_gpus: 2" in out


def test_exponent_floats_without_a_dot_are_numbers():
    from eaglecache.config import parse_override

    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("x.y=[3e-4,2]") == ("x.y", [3e-4, 2])
    assert parse_override("x.y=abc") == ("x.y", "abc")


@pytest.mark.parametrize("key", ["train.draft.aux_layer_ids", "precompute.aux_layer_ids"])
@pytest.mark.parametrize("ids", ["[30,2,57]", "[2,30,30]", "[5,4]"])
def test_aux_layer_ids_out_of_ascending_order_are_refused(key, ids):
    """vLLM concatenates the aux states in ascending layer order: any other order would train fc on
    a permutation of what serving feeds it."""
    with pytest.raises(UserError, match=re.escape(f"config key {key}: ") + ".*strictly ascending"):
        load_config(None, [f"{key}={ids}"])
    assert load_config(None, [f"{key}=[2,30,57]"])  # ascending stays valid


def test_cli_aux_layer_ids_out_of_order_is_one_line_and_exit_2(capsys):
    assert main(["train", "--output", "x", "train.draft.aux_layer_ids=[4,2]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "strictly ascending" in err and "\n" not in err


def test_one_identity_rule_honours_runtime_only_settings():
    """Memory sizing, writer parallelism and logging never change an artifact's fingerprint; a content
    setting does; the target's vLLM-only settings count for a cache but not for a training run."""
    from eaglecache.train.checkpoint import run_fingerprint

    base = load_config(None)
    runtime = load_config(None, ["target.kv_cache_gib=3", "precompute.batch_size=7", "train.log_interval=3",
                                 "train.launcher.num_gpus=1"])
    assert base.fingerprint("target", "precompute") == runtime.fingerprint("target", "precompute")
    assert run_fingerprint(base) == run_fingerprint(runtime)
    tp = load_config(None, ["target.tensor_parallel_size=2"])
    assert base.fingerprint("target", "precompute") != tp.fingerprint("target", "precompute")
    assert run_fingerprint(base) == run_fingerprint(tp)
    assert run_fingerprint(base) != run_fingerprint(load_config(None, ["train.ttt_decay=0.7"]))
    assert base.fingerprint("precompute") != load_config(None, ["precompute.codec=none"]).fingerprint("precompute")


def test_null_means_defaults_are_resolved_by_the_config():
    config = load_config(None, ["data.max_seq_length=300"])
    assert config.train.max_seq_length is None and config.train_max_seq_length == 300
    assert load_config(None, ["train.max_seq_length=64"]).train_max_seq_length == 64
    assert config.precompute_aux_layer_ids(16) == [2, 8, 13]
    assert load_config(None, ["precompute.aux_layer_ids=[1,3]"]).precompute_aux_layer_ids(16) == [1, 3]
    assert config.draft_aux_layer_ids([2, 8, 13]) == [2, 8, 13]
    picked = load_config(None, ["train.draft.aux_layer_ids=[2,13]"])
    assert picked.draft_aux_layer_ids([2, 8, 13]) == [2, 13]
    with pytest.raises(UserError, match=re.escape("layers [4] are not in the features") + ".*precompute.aux_layer_ids"):
        load_config(None, ["train.draft.aux_layer_ids=[2,4]"]).draft_aux_layer_ids([2, 8, 13])


@pytest.mark.parametrize("overrides, message", [
    (["train.global_batch_size=5", "train.micro_batch_size=2"], "config section train: global_batch_size 5 is not a "
                                                                 "multiple of micro_batch_size 2"),
    (["train.ttt_length=65"], "config key train.ttt_length: Input should be less than or equal to 64"),
])
def test_settings_that_cannot_work_are_refused_in_one_line_with_exit_2(overrides, message, capsys):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)
    assert main(["train", "--output", "x", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_epochs_and_max_steps_together_stop_at_whichever_ends_first():
    """Both set is allowed (configs set epochs, tests add max_steps): max_steps caps, it never extends."""
    from eaglecache.train.loader import SamplePlan

    config = load_config(None, ["train.epochs=1", "train.max_steps=3"])
    plan = SamplePlan(list(range(40)), [8] * 40, seed=0, global_batch_size=4, micro_batch_size=1, world_size=1)
    assert plan.total_steps(config.train.epochs, config.train.max_steps) == 3
    assert plan.total_steps(config.train.epochs, 100) == 10


def test_where_the_server_listens_is_not_part_of_a_bench_result():
    base = load_config(None)
    moved = load_config(None, ["serve.host=0.0.0.0", "serve.served_model_name=x", "serve.demo.num_conversations=5"])
    assert base.fingerprint("target", "serve") == moved.fingerprint("target", "serve")
    assert base.fingerprint("target", "serve") != load_config(None, ["serve.max_new_tokens=7"]).fingerprint(
        "target", "serve")


def test_a_run_of_the_previous_release_keeps_its_fingerprint():
    """Settings added since (the draft families) enter the identity only when set off their default, so the
    run directory written by release 95dabc5 (tests/fixtures/run_v1) still matches its config: it resumes."""
    import json

    from eaglecache.train.checkpoint import run_fingerprint

    run = Path(__file__).parent / "fixtures" / "run_v1"
    recorded = json.loads((run / "run.json").read_text())["config_hash"]
    config = load_config(run / "config.yaml")
    assert run_fingerprint(config) == recorded
    config.train.draft.family = "dflash"
    assert run_fingerprint(config) != recorded


def test_eagle31_defaults_to_its_papers_per_layer_norms_and_older_joint_runs_keep_their_fingerprint():
    from eaglecache.formats.draft import family_arch

    default = load_config(None, ["train.draft.family=eagle3.1"])
    joint = load_config(None, ["train.draft.family=eagle3.1", "train.draft.aux_norm=joint"])
    assert family_arch("eagle3.1", default.train.draft.aux_norm)["aux_norm"] == "per_layer"
    # the release before wrote joint by default and left aux_norm out of the identity: such a run still resumes
    assert "aux_norm" not in joint.train.draft.identity() and joint.train.draft.identity()["family"] == "eagle3.1"
    assert default.fingerprint("train") != joint.fingerprint("train")
    assert default.fingerprint("train") == load_config(
        None, ["train.draft.family=eagle3.1", "train.draft.aux_norm=per_layer"]).fingerprint("train")
    # EAGLE3's identity is untouched; P-EAGLE may normalize; EAGLE3 and DFlash have no place for a norm
    assert "aux_norm" not in load_config(None).train.draft.identity()
    peagle = load_config(None, ["train.draft.family=peagle", "train.draft.aux_norm=per_layer"])
    assert peagle.train.draft.identity()["aux_norm"] == "per_layer"
    for family in ("eagle3", "dflash"):
        with pytest.raises(UserError, match=f"does not apply to the {family} family"):
            load_config(None, [f"train.draft.family={family}", "train.draft.aux_norm=per_layer"])
    # a resolved config of the release before holds aux_norm: joint whatever the family: read as the default
    for family in ("eagle3", "peagle", "dflash"):
        old = load_config(None, [f"train.draft.family={family}", "train.draft.aux_norm=joint"])
        assert old.train.draft.aux_norm is None and "aux_norm" not in old.train.draft.identity()


def test_parallel_families_train_as_many_slots_as_are_served_and_eagle3_keeps_its_depth():
    eagle3 = load_config(None)
    assert eagle3.train.ttt_length == 7
    assert eagle3.fingerprint("train") == load_config(None, ["train.ttt_length=7"]).fingerprint("train")
    for family in ("peagle", "dflash"):
        served = load_config(None, [f"train.draft.family={family}"])
        assert served.train.ttt_length == served.serve.num_speculative_tokens == 3
        assert load_config(None, [f"train.draft.family={family}", "serve.num_speculative_tokens=5"]).train.ttt_length == 5
        assert load_config(None, [f"train.draft.family={family}", "train.ttt_length=7"]).train.ttt_length == 7
    assert load_config(None, ["train.draft.family=eagle3.1", "serve.num_speculative_tokens=5"]).train.ttt_length == 7


def test_an_override_of_the_family_resolves_a_null_ttt_length_anew():
    """ablate's grid applies `train.draft.family=peagle` to a loaded (resolved) base config: the slots follow the
    new family, as they do when the same overrides are given at once; an explicit depth stays."""
    base = load_config(None)
    assert base.train.ttt_length == 7
    peagle = with_overrides(base, ["train.draft.family=peagle"])
    assert peagle.train.ttt_length == 3 == load_config(None, ["train.draft.family=peagle"]).train.ttt_length
    assert with_overrides(peagle, ["train.draft.family=eagle3"]).train.ttt_length == 7
    assert with_overrides(load_config(None, ["train.ttt_length=5"]), ["train.draft.family=peagle"]).train.ttt_length == 5


def test_the_demo_trains_its_measured_best_family_unless_the_user_chose_one(tmp_path):
    from eaglecache.serve.cli import DEMO_FAMILY, demo_config

    assert DEMO_FAMILY != load_config(None).train.draft.family  # the packaged config keeps EAGLE3
    chosen = demo_config(load_config(None), None, [])
    assert chosen.train.draft.family == DEMO_FAMILY and chosen.train.ttt_length == 7
    for family in ("eagle3", "dflash"):
        for overrides in ([f"train.draft.family={family}"], [f"train.draft.family ={family}"]):  # as the config reads it
            assert demo_config(load_config(None, overrides), None, overrides).train.draft.family == family
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  draft:\n    family: peagle\n")
    assert demo_config(load_config(own), str(own), []).train.draft.family == "peagle"
    assert demo_config(load_config("tiny"), "tiny", []).train.draft.family == "eagle3"  # a config named: its own
