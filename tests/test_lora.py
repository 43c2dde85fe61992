"""LoRA adapters: PEFT interop both ways (logits within the fp32 contract), frozen base, merge/unmerge, an int8
base that trains (QLoRA-style), gradient checkpointing, bf16 autocast, torch.compile, and bad adapter files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama_core import LlamaForCausalLM
from llama_core.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_TARGETS,
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    add_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from llama_core.modeling.linear import linear
from llama_core.quant import Int8Linear, quantize
from tests.conftest import random_model, small_config

ATOL = 1e-4  # fp32 logits vs transformers + peft, per the numerics contract
IDS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8, 19, 64, 2, 31]])


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """A fresh adapter has B = 0 (no effect); give every B weights so a skipped or mis-scaled adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def lora_model(targets=LORA_TARGETS, r: int = 4, alpha: float = 8.0, **config) -> LlamaForCausalLM:
    model = random_model(small_config(**config))
    add_lora(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=tuple(targets)))
    randomize_adapters(model)
    return model


# ---- interop with PEFT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(transformers_module, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    model = random_model(small_config())
    model.save_pretrained(tmp_path / "base")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS, use_rslora=rslora,
                               base_model_name_or_path=str(tmp_path / "base")))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert len(saved) == 2 * len(LORA_TARGETS) * 2  # A and B, every target, 2 layers
    hf = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].use_rslora is rslora
    torch.testing.assert_close(logits(theirs), logits(model.eval()), atol=ATOL, rtol=0)
    assert (logits(model) - logits(unload_lora(model))).abs().max() > 100 * ATOL  # the adapters mattered


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     r".*\.(q_proj|v_proj)"])
def test_peft_adapter_loads_in_ours(transformers_module, tmp_path, targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    fields = {k: v for k, v in small_config().to_dict().items()
              if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}
    hf = transformers_module.LlamaForCausalLM(transformers_module.LlamaConfig(**fields)).eval()
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                    task_type="CAUSAL_LM"))
    randomize_adapters(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "adapter")

    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = load_adapter(ours, tmp_path / "adapter")
    assert config.r == 4 and config.scaling == 4.0
    expected = 2 * (7 if isinstance(targets, list) else 2)
    assert len(lora_layers(ours)) == expected
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=ATOL, rtol=0)


# ---- training semantics ------------------------------------------------------------------------------------

def test_only_adapters_train():
    model = lora_model(targets=("q_proj", "v_proj")).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2
    model(IDS, labels=IDS).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoraConfig())


def test_merge_and_unmerge_give_the_adapter_logits(transformers_module, tmp_path):
    model = lora_model().eval()
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    adapted = logits(model)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)  # fp32 rounding of W + BA only
    assert any((model.state_dict()[k] - v).abs().max() > 1e-4 for k, v in original.items())
    unmerge_lora(model)
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match=r"unmerged LoRA adapters .*merge_and_unload"):
        model.save_pretrained(tmp_path / "unmerged")  # base_layer./lora_A. names no loader reads
    assert not (tmp_path / "unmerged").exists()
    merge_and_unload(model)  # plain linears: saves as an HF checkpoint transformers reads
    assert not lora_layers(model) and all(type(m) is not LoraLinear for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    hf = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(hf), adapted, atol=ATOL, rtol=0)


def _train_steps(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_int8_weight_only_base_trains():
    model = random_model(small_config()).train()
    quantize(model, "int8-weight-only", skip=["lm_head"])
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer) is Int8Linear and q.lora_A.weight.dtype == torch.float32
    frozen = q.base_layer.weight.clone()
    losses = _train_steps(model, 6)
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(q.base_layer.weight, frozen)  # int8 base untouched
    # the input gradient flows through every dequantised base: layer 0's adapters get gradients
    assert q.lora_B.weight.abs().sum() > 0
    model.eval()
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into int8 weights"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())  # refused before any change
    adapted = logits(model)
    merge_and_unload(model)  # dequantised + adapter, full precision
    assert not any(type(m) is Int8Linear for m in model.modules())
    torch.testing.assert_close(logits(model), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_input_gradient_is_the_dequantised_linears(dtype):
    layer = Int8Linear.from_linear(nn.Linear(48, 40, bias=True), "int8-weight-only")
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, 40, dtype=dtype)
    layer(x).backward(grad)
    ref_x = x.detach().clone().requires_grad_()
    nn.functional.linear(ref_x, layer.dequantized_weight(dtype), layer.bias.to(dtype)).backward(grad)
    assert x.grad.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    assert layer.weight.grad is None and not layer.bias.requires_grad  # frozen


def test_w8a8_base_is_refused():
    model = random_model(small_config())
    quantize(model, "int8")
    with pytest.raises(ValueError, match="needs mode 'int8-weight-only'"):
        add_lora(model, LoraConfig())


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = lora_model().train()
    plain = _adapter_grads(model)
    model.gradient_checkpointing_enable()
    checkpointed = _adapter_grads(model)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_autocast_tracks_fp32():
    model = lora_model().train()
    fp32 = _adapter_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _adapter_grads(model)
    assert all(g.dtype == torch.float32 for g in bf16.values())  # fp32 master adapters
    a, b = torch.cat([g.flatten() for g in fp32.values()]), torch.cat([g.flatten() for g in bf16.values()])
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_dropout_only_in_training():
    model = random_model(small_config())
    add_lora(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=("q_proj",)))
    randomize_adapters(model)
    model.eval()
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(logits(model), logits(model))


@pytest.mark.slow
def test_compiled_layer_keeps_the_adapter():
    """Compiled one-row decoding takes a reduction shortcut for plain linears; an adapter layer must still be
    called (output with the adapter, not the base's), and a compiled training shape gives eager's gradients."""
    model = lora_model(targets=("gate_proj", "up_proj", "down_proj")).train()
    mlp = model.model.layers[0].mlp
    compiled = torch.compile(mlp)
    one_row = torch.randn(1, 1, 64)
    with torch.no_grad():
        eager_out, compiled_out = mlp(one_row), compiled(one_row)
        base_out = linear(mlp.down_proj.base_layer, torch.nn.functional.silu(
            mlp.gate_proj.base_layer(one_row)) * mlp.up_proj.base_layer(one_row))
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    assert (compiled_out - base_out).abs().max() > 1e-3
    x = torch.randn(2, 8, 64)
    mlp(x).square().sum().backward()
    eager_grad = mlp.up_proj.lora_A.weight.grad.clone()
    mlp.zero_grad()
    compiled(x).square().sum().backward()
    torch.testing.assert_close(mlp.up_proj.lora_A.weight.grad, eager_grad, atol=1e-5, rtol=1e-4)


# ---- files and errors --------------------------------------------------------------------------------------

def test_saved_files_are_peft_shaped(tmp_path):
    model = lora_model(targets=("q_proj", "v_proj"))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    # round trip into a fresh model of the same base
    fresh = random_model(small_config())
    load_adapter(fresh, tmp_path / "a")
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[k], v)


@pytest.fixture
def saved_adapter(tmp_path):
    save_adapter(lora_model(targets=("q_proj", "v_proj")), tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **fields):
    data = json.loads((path / ADAPTER_CONFIG).read_text())
    data.update(fields)
    (path / ADAPTER_CONFIG).write_text(json.dumps(data))


@pytest.mark.parametrize("fields, message", [
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(peft_type="IA3"), "peft_type is 'IA3'"),
    (dict(target_modules=["q_proj", "lm_head"]), r"unsupported LoRA target module\(s\) \['lm_head'\]"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern="),
    (dict(modules_to_save=["lm_head"]), "modules_to_save="),
    (dict(r=8), r"lora_A.weight has shape \(4, 64\), the model expects \(8, 64\)"),
    (dict(target_modules=["q_proj"]), "tensor\\(s\\) for modules the config does not target"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "adapter tensor\\(s\\) missing"),
    (dict(r=0), "rank r must be an integer >= 1"),
])
def test_bad_adapter_config_is_refused_and_model_unchanged(saved_adapter, fields, message):
    _edit_config(saved_adapter, **fields)
    model = random_model(small_config())
    before = logits(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, saved_adapter)
    assert not lora_layers(model) and getattr(model, "lora_config", None) is None
    assert all(p.requires_grad for p in model.parameters())  # not left frozen either
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_bad_adapter_files_are_refused(saved_adapter, tmp_path):
    model = random_model(small_config())
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        load_adapter(model, tmp_path / "nowhere")
    weights = saved_adapter / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, saved_adapter)
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="lora_magnitude_vector is not a lora_A / lora_B weight"):
        load_adapter(model, saved_adapter)
    (saved_adapter / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(model, saved_adapter)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model\.safetensors"):
        load_adapter(model, saved_adapter)


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "rank r must be an integer"),
    (dict(lora_alpha=0), "lora_alpha must be a number > 0"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(target_modules=("embed_tokens",)), "unsupported LoRA target"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(target_modules="q_proj("), "not a valid regular expression"),
])
def test_config_checks(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kw)


def test_regex_beyond_the_decoder_linears_is_refused():
    with pytest.raises(ValueError, match="adapters go only on"):
        add_lora(random_model(small_config()), LoraConfig(target_modules=r".*(q_proj|lm_head)"))
