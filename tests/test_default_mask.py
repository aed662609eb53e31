"""What the default mask decays on other people's layers, and the peer presets checked
against the peers' own grouping code.

* Flax (linen and NNX) and Equinox layers as their libraries build them: exactly which
  paths ``masks.DEFAULT`` decays, and which of the others a rank-only rule (``ndim >= 2``,
  ``masks.NANOGPT``) would decay too: the 2-D attention-head biases, Equinox's ``(C, 1, 1)``
  conv biases, the ``(L, d)`` biases and norm parameters of stacked and scanned layers.
* Small PyTorch models, their ``named_parameters()`` turned into a params tree with the
  same names: ``masks.TIMM`` against timm's ``param_groups_weight_decay``, ``masks.NANOGPT``
  against nanoGPT's ``configure_optimizers`` rule, ``masks.HF`` against Hugging Face
  ``Trainer.get_decay_parameter_names`` (restated from transformers' source), and what
  ``masks.DEFAULT`` decays on the same models.
* ``wdjax.describe`` prints the choice: ``-`` for what is left alone, the rate otherwise.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from helpers import selected
from peers import load_timm

import wdjax
from wdjax import masks

# ------------------------------------------------------------- JAX layers

ParamsFn = Callable[[], Any]


def nnx_attention() -> Any:
    mha = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    return nnx.state(mha, nnx.Param)


class _MnistCNN(eqx.Module):
    """Equinox's MNIST tutorial CNN, smaller."""

    layers: list

    def __init__(self, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1),
            eqx.nn.MaxPool2d(kernel_size=2),
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(3 * 12 * 12, 8, key=k2),
            jax.nn.sigmoid,
            eqx.nn.Linear(8, 10, key=k3),
            jax.nn.log_softmax,
        ]


def eqx_cnn() -> Any:
    return eqx.filter(_MnistCNN(jax.random.key(0)), eqx.is_array)


def eqx_conv_transpose() -> Any:
    return eqx.filter(eqx.nn.ConvTranspose2d(2, 3, 3, key=jax.random.key(0)), eqx.is_array)


class _EqxNormed(eqx.Module):
    """Equinox norms name their scale ``weight``: only the module name says norm."""

    ln: eqx.nn.LayerNorm
    rms_norm: eqx.nn.RMSNorm
    proj: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        self.ln = eqx.nn.LayerNorm(4)
        self.rms_norm = eqx.nn.RMSNorm(4)
        self.proj = eqx.nn.Linear(4, 4, key=key)


def eqx_norms() -> Any:
    return eqx.filter(_EqxNormed(jax.random.key(0)), eqx.is_array)


def eqx_stacked_norms() -> Any:
    """Three ``_EqxNormed`` blocks stacked by ``eqx.filter_vmap``: ``(3, 4)`` norm weights."""
    keys = jax.random.split(jax.random.key(0), 3)
    return eqx.filter(eqx.filter_vmap(_EqxNormed)(keys), eqx.is_array)


class _NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)


def nnx_stacked() -> Any:
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> _NnxBlock:
        return _NnxBlock(rngs)

    return nnx.state(create(nnx.Rngs(0)), nnx.Param)


class _LinenBlock(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return linen.LayerNorm()(linen.Dense(8)(x)), None


class _LinenScanned(linen.Module):
    @linen.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = linen.Embed(10, 8)(ids)
        scan = linen.scan(
            _LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = scan(name="blocks")(x, None)
        return linen.Dense(2)(x)


def linen_scanned() -> Any:
    return _LinenScanned().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))


class _LinenEmbed(linen.Module):
    @linen.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = linen.LayerNorm()(linen.Embed(10, 4, name="wte")(ids))
        return linen.Dense(3)(h)


def linen_embed() -> Any:
    return _LinenEmbed().init(jax.random.key(0), jnp.zeros((2,), jnp.int32))


class _NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 4, (3,), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.rms = nnx.RMSNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


def nnx_net() -> Any:
    return nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param)


def nnx_net_full_state() -> Any:
    """The whole state, batch statistics included (``bn/mean``, ``bn/var``)."""
    state = nnx.state(_NnxNet(nnx.Rngs(0)))
    assert {"bn/mean", "bn/var"} <= {p for p, _ in masks.leaves_with_paths(state)}
    return state


# name: (params, decayed by DEFAULT, decayed by default(embeddings=False),
#        what a rank-only rule (NANOGPT) decays on top of DEFAULT)
JAX_CASES: dict[str, tuple[ParamsFn, set[str], set[str], set[str]]] = {
    "nnx.MultiHeadAttention": (
        nnx_attention,
        {"query/kernel", "key/kernel", "value/kernel", "out/kernel"},
        {"query/kernel", "key/kernel", "value/kernel", "out/kernel"},
        {"query/bias", "key/bias", "value/bias"},  # (heads, head_dim)
    ),
    "eqx-mnist-cnn": (
        eqx_cnn,
        {"layers/0/weight", "layers/4/weight", "layers/6/weight"},
        {"layers/0/weight", "layers/4/weight", "layers/6/weight"},
        {"layers/0/bias"},  # (3, 1, 1)
    ),
    "eqx.nn.ConvTranspose2d": (eqx_conv_transpose, {"weight"}, {"weight"}, {"bias"}),
    "eqx-LayerNorm-RMSNorm": (eqx_norms, {"proj/weight"}, {"proj/weight"}, set()),
    "eqx-stacked-norms": (
        eqx_stacked_norms,
        {"proj/weight"},
        {"proj/weight"},
        {"ln/weight", "ln/bias", "rms_norm/weight", "rms_norm/bias", "proj/bias"},
    ),
    "nnx.vmap-stacked": (
        nnx_stacked,
        {"linear/kernel"},
        {"linear/kernel"},
        {"linear/bias", "norm/bias", "norm/scale"},  # (3, 8)
    ),
    "linen.scan": (
        linen_scanned,
        {
            "params/Embed_0/embedding",
            "params/blocks/Dense_0/kernel",
            "params/Dense_0/kernel",
        },
        {"params/blocks/Dense_0/kernel", "params/Dense_0/kernel"},
        {  # (3, 8)
            "params/blocks/Dense_0/bias",
            "params/blocks/LayerNorm_0/bias",
            "params/blocks/LayerNorm_0/scale",
        },
    ),
    "linen.Embed": (
        linen_embed,
        {"params/wte/embedding", "params/Dense_0/kernel"},
        {"params/Dense_0/kernel"},
        set(),
    ),
    "nnx-Embed-Conv-BatchNorm-RMSNorm": (
        nnx_net,
        {"embed/embedding", "conv/kernel", "head/kernel"},
        {"conv/kernel", "head/kernel"},
        set(),
    ),
    "nnx-full-state": (
        nnx_net_full_state,
        {"embed/embedding", "conv/kernel", "head/kernel"},
        {"conv/kernel", "head/kernel"},
        set(),
    ),
}


@pytest.mark.parametrize(
    ("make", "decayed", "no_embeddings", "rank_only"), JAX_CASES.values(), ids=JAX_CASES
)
def test_default_mask_on_flax_and_equinox_layers(make, decayed, no_embeddings, rank_only):
    params = make()
    assert selected(params, masks.DEFAULT) == decayed
    assert selected(params, masks.default(embeddings=False)) == no_embeddings
    assert selected(params, masks.NANOGPT) - decayed == rank_only
    leaves = dict(masks.leaves_with_paths(params))
    assert all(np.ndim(leaves[p]) >= 2 for p in rank_only)  # what the name rule is for
    # describe agrees, row by row
    table = wdjax.describe(params, masks.DEFAULT, rate=0.1, file=None)
    assert {r.path: r.rate for r in table.rows if r.rate is not None} == dict.fromkeys(decayed, 0.1)
    assert [r.path for r in table.rows] == list(leaves)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nnx.state(nnx.BatchNorm(4, rngs=nnx.Rngs(0)), nnx.Param),
        lambda: nnx.state(nnx.RMSNorm(4, rngs=nnx.Rngs(0)), nnx.Param),
        lambda: nnx.state(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), nnx.Param),
    ],
    ids=["nnx.BatchNorm", "nnx.RMSNorm", "nnx.LayerNorm"],
)
def test_a_lone_norm_layer_has_nothing_to_decay(make):
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        masks.resolve(make(), masks.DEFAULT)


def test_adamw_leaves_stacked_biases_and_scales_alone():
    """End to end: ``wdjax.adamw``'s default mask on ``nnx.vmap``-stacked layers decays
    the kernels and leaves the ``(3, 8)`` biases and scales bit for bit."""
    params = nnx_stacked()
    tx = wdjax.adamw(0.1, 0.5)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        new["linear"]["kernel"][...], 0.95 * params["linear"]["kernel"][...], rtol=1e-6
    )
    for layer, name in [("linear", "bias"), ("norm", "bias"), ("norm", "scale")]:
        np.testing.assert_array_equal(new[layer][name][...], params[layer][name][...])


# ---------------------------------------------------------- wdjax.describe


def test_describe_prints_the_choice():
    buf = io.StringIO()
    table = wdjax.describe(linen_scanned(), masks.DEFAULT, rate=0.05, file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "size", "rate"]
    printed = {line.split()[0]: line.split()[-1] for line in lines[1:-1]}
    assert printed == {
        "params/Dense_0/bias": "-",
        "params/Dense_0/kernel": "0.05",
        "params/Embed_0/embedding": "0.05",
        "params/blocks/Dense_0/bias": "-",
        "params/blocks/Dense_0/kernel": "0.05",
        "params/blocks/LayerNorm_0/bias": "-",
        "params/blocks/LayerNorm_0/scale": "-",
    }
    decayed = 8 * 2 + 10 * 8 + 3 * 8 * 8
    assert table.decayed == decayed and table.total == decayed + 2 + 3 * 3 * 8
    assert lines[-1] == f"regularized {decayed} of {table.total} parameters " + (
        f"({decayed / table.total:.1%}); not regularized {table.total - decayed}"
    )


# ------------------------------------------------- PyTorch models and peers


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="PyTorch is needed to compare with the peers")
    torch.manual_seed(0)
    return torch


def gpt(torch: Any) -> Any:
    """nanoGPT / GPT-2 names (``wte``, ``h.0.ln_1``, ``ln_f``; ``lm_head`` tied to ``wte``),
    linear layers with and without bias, and a conv stem with a BatchNorm."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = nn.ModuleDict(
                {"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d, bias=False)}
            )
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    class GPT(nn.Module):
        def __init__(self, vocab: int = 11, context: int = 5, d: int = 4):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(context, d)
            self.stem = nn.Conv2d(3, d, 2)
            self.bn = nn.BatchNorm2d(d)
            self.h = nn.ModuleList([Block(d) for _ in range(2)])
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as nanoGPT does

    return GPT()


def llama(torch: Any) -> Any:
    """Hugging Face Llama / Qwen names: RMSNorms named ``*_layernorm`` and ``norm``,
    biases on the q/k/v projections only, an untied ``lm_head``."""
    nn = torch.nn
    d = 4

    def attention() -> Any:
        return nn.ModuleDict(
            {
                "q_proj": nn.Linear(d, d),
                "k_proj": nn.Linear(d, d),
                "v_proj": nn.Linear(d, d),
                "o_proj": nn.Linear(d, d, bias=False),
            }
        )

    def layer() -> Any:
        return nn.ModuleDict(
            {
                "input_layernorm": nn.RMSNorm(d),
                "self_attn": attention(),
                "post_attention_layernorm": nn.RMSNorm(d),
                "mlp": nn.ModuleDict(
                    {k: nn.Linear(d, 2 * d, bias=False) for k in ("gate_proj", "up_proj")}
                    | {"down_proj": nn.Linear(2 * d, d, bias=False)}
                ),
            }
        )

    model = nn.Module()
    model.embed_tokens = nn.Embedding(11, d)
    model.layers = nn.ModuleList([layer() for _ in range(2)])
    model.norm = nn.RMSNorm(d)
    model.lm_head = nn.Linear(d, 11, bias=False)
    return model


def vit(torch: Any) -> Any:
    """timm's ViT names: ``cls_token``, ``pos_embed``, ``patch_embed.proj`` (a conv),
    ``blocks.0.norm1``, ``head``."""
    nn = torch.nn
    d = 4

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(d)
            self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
            self.norm2 = nn.LayerNorm(d)
            self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)})

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, d, 2, stride=2)
            self.blocks = nn.ModuleList([Block()])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 3)

    return ViT()


def affine(torch: Any) -> Any:
    """A model whose own parameters are a weight and a broadcasting ``(1, d)`` bias."""
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.ones(3, 2))
    model.bias = torch.nn.Parameter(torch.zeros(1, 2))
    return model


TORCH_MODELS = {"gpt": gpt, "llama": llama, "vit": vit, "affine": affine}


def params_of(model: Any) -> dict:
    """``model.named_parameters()`` as a nested dict of NumPy arrays, one level per
    dotted component: ``"h.0.ln_1.weight"`` is ``params["h"]["0"]["ln_1"]["weight"]``,
    path ``"h/0/ln_1/weight"``. Tied parameters appear once, as in ``named_parameters``."""
    tree: dict = {}
    for name, p in model.named_parameters():
        *modules, leaf = name.split(".")
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = p.detach().numpy().copy()
    return tree


def decayed_names(model: Any, mask: Any) -> set[str]:
    """The torch names of the parameters ``mask`` selects in ``params_of(model)``."""
    return {p.replace("/", ".") for p in selected(params_of(model), mask)}


@pytest.fixture(scope="module")
def timm_param_groups():
    """timm's own ``param_groups_weight_decay``, imported by ``peers.load_timm``: stub
    ``timm`` / ``timm.optim`` packages (``__path__`` the installed directories) stand in
    for timm's package ``__init__``, which imports torchvision and fails with a CPU-only
    torch; ``timm.models`` is filled from ``timm.models._manipulate`` for the
    ``group_parameters`` that ``_param_groups`` imports. ``sys.modules`` is restored when
    the module's tests are done; skips if timm is not installed."""
    with load_timm(
        "timm.optim._param_groups",
        fill={"timm.layers": "timm.layers.config", "timm.models": "timm.models._manipulate"},
    ) as module:
        yield module.param_groups_weight_decay


def timm_decayed(model: Any, param_groups_weight_decay: Callable) -> set[str]:
    groups = param_groups_weight_decay(model, weight_decay=0.1)
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.1) for g in groups)
    return {n for n, p in model.named_parameters() if id(p) in ids}


def nanogpt_decayed(model: Any) -> set[str]:
    """nanoGPT's ``GPT.configure_optimizers``, restated: every parameter that requires
    grad and has ``dim() >= 2`` is decayed (embeddings included)."""
    param_dict = {pn: p for pn, p in model.named_parameters()}
    param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
    return {n for n, p in param_dict.items() if p.dim() >= 2}


HF_FORBIDDEN_NAME_PATTERNS = [
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
]


def hf_decayed(model: Any, torch: Any) -> set[str]:
    """Hugging Face ``Trainer.get_decay_parameter_names``, restated from transformers'
    ``trainer.py`` and ``trainer_pt_utils.get_parameter_names``: walking the modules,
    drop every parameter inside an ``nn.LayerNorm`` (by type) and every name matching a
    forbidden pattern (lowercased, ``re.search``); the rest of ``named_parameters()``
    is decayed."""
    patterns = [re.compile(p) for p in HF_FORBIDDEN_NAME_PATTERNS]

    def forbidden(name: str) -> bool:
        return any(p.search(name.lower()) for p in patterns)

    def get_parameter_names(module: Any) -> list[str]:
        result = []
        for name, child in module.named_children():
            result += [
                f"{name}.{n}"
                for n in get_parameter_names(child)
                if not isinstance(child, torch.nn.LayerNorm) and not forbidden(f"{name}.{n}")
            ]
        result += [k for k in module._parameters if not forbidden(k)]
        return result

    names = set(get_parameter_names(model))
    return {n for n, p in model.named_parameters() if n in names and p.requires_grad}


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_timm_preset_is_timms_param_groups_weight_decay(name, torch, timm_param_groups):
    model = TORCH_MODELS[name](torch)
    assert decayed_names(model, masks.TIMM) == timm_decayed(model, timm_param_groups)


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_nanogpt_preset_is_nanogpts_rule(name, torch):
    model = TORCH_MODELS[name](torch)
    assert decayed_names(model, masks.NANOGPT) == nanogpt_decayed(model)


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_hf_preset_is_hf_trainers_rule(name, torch):
    """HF drops nn.LayerNorm parameters by type; masks.HF recognises the LayerNorm names
    HF's name patterns miss (GPT-2's ln_1, ln_2, ln_f; timm's norm1, norm2)."""
    model = TORCH_MODELS[name](torch)
    assert decayed_names(model, masks.HF) == hf_decayed(model, torch)


GPT_WEIGHTS = {
    f"h.{i}.{m}.weight"
    for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}
LLAMA_WEIGHTS = {
    f"layers.{i}.{m}.weight"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
} | {"lm_head.weight"}
VIT_WEIGHTS = {"head.weight"} | {
    f"blocks.0.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
}

# name: (decayed by DEFAULT, by default(embeddings=False))
DEFAULT_ON_TORCH = {
    "gpt": (
        GPT_WEIGHTS | {"stem.weight", "wte.weight", "wpe.weight"},
        GPT_WEIGHTS | {"stem.weight"},
    ),
    "llama": (LLAMA_WEIGHTS | {"embed_tokens.weight"}, LLAMA_WEIGHTS),
    # the patch embedding is a conv, but its path says embed
    "vit": (
        VIT_WEIGHTS | {"cls_token", "pos_embed", "patch_embed.proj.weight"},
        VIT_WEIGHTS,
    ),
    "affine": ({"weight"}, {"weight"}),
}


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_default_mask_on_torch_models(name, torch):
    """Weights and embeddings; never a bias, a LayerNorm/RMSNorm/BatchNorm parameter (nor
    the ``(1, d)`` bias of ``affine``); ``embeddings=False`` drops the embeddings."""
    model = TORCH_MODELS[name](torch)
    with_embeddings, without = DEFAULT_ON_TORCH[name]
    assert decayed_names(model, masks.DEFAULT) == with_embeddings
    assert decayed_names(model, masks.default(embeddings=False)) == without
    never = {
        n
        for n, _ in model.named_parameters()
        if n.endswith("bias") or re.search(r"(^|\.)(ln_\w+|bn|norm\w*|\w+_layernorm)\.", n)
    }
    assert never and not never & with_embeddings
