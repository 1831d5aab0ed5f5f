"""qmatmul / qdot_general / qeinsum: every path against the float32 reference
(values and grad w.r.t. x), the Pallas kernels in interpret mode and lowered for
GPU and TPU, path selection, and the memory property: no dequantized weight is
kept for the backward pass."""

import functools
import importlib
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import matrix
from jax import export

import qlora_jax as qj
from qlora_jax._src.ops import pallas

# Tolerance of every fast path against the reference, relative to max |reference|.
# float32: exact dequantization, float32 accumulation. bfloat16 / float16: the
# dequantized weight (or codebook value) is rounded to the compute dtype, and
# the output is rounded once more.
TOLERANCE = {
    jnp.float32: 1e-5,
    jnp.bfloat16: 2e-2,
    jnp.float16: 2e-3,
}
FORMATS = ["nf4", "fp4", "int4", "int8"]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
BLOCKS = [32, 64, 128, 256, 512, 1024]
XLA_BLOCKS = [32, 64, 256, 1024]


def _assert_close(got, ref, dtype):
    got, ref = np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    scale = float(np.abs(ref).max())
    assert scale > 0
    np.testing.assert_allclose(got, ref, atol=TOLERANCE[dtype] * scale, rtol=0)


def _case(fmt, dtype, block, k, n, m=(2, 3), seed=0, double_quant=True):
    kernel = jax.random.normal(jax.random.key(seed), (k, n)) * 0.05
    q = qj.quantize(kernel, fmt, block, double_quant)
    x = jax.random.normal(jax.random.key(seed + 1), (*m, k)).astype(dtype)
    return x, q


def _loss(x, q, path, **kw):
    return jnp.sum(jnp.tanh(qj.qmatmul(x, q, path=path, **kw).astype(jnp.float32)))


@pytest.mark.parametrize(("fmt", "dtype", "block"), matrix(FORMATS, DTYPES, XLA_BLOCKS))
def test_xla_path_matches_reference_values_and_grad(fmt, dtype, block):
    x, q = _case(fmt, dtype, block, 1024, 128, double_quant=block % 64 == 0)
    got = jax.jit(qj.qmatmul, static_argnames="path")(x, q, path="xla")
    ref = qj.qmatmul(x, q, path="reference")
    assert got.shape == (2, 3, 128) and got.dtype == dtype
    _assert_close(got, ref, dtype)
    g = jax.jit(jax.grad(_loss), static_argnums=2)(x, q, "xla")
    assert g.dtype == dtype
    _assert_close(g, jax.grad(_loss)(x, q, "reference"), dtype)


@pytest.mark.parametrize(("fmt", "dtype", "block"), matrix(FORMATS, DTYPES, [128, 512, 2048, 4096]))
def test_xla_path_matches_reference_for_the_other_block_sizes(fmt, dtype, block):
    """Blocks of 2048 and 4096 on a 1024-long input straddle rows (flat layout)."""
    x, q = _case(fmt, dtype, block, 1024, 128)
    assert q.row_layout == (block <= 1024)
    _assert_close(jax.jit(qj.qmatmul)(x, q), qj.qmatmul(x, q, path="reference"), dtype)
    _assert_close(jax.grad(_loss)(x, q, "xla"), jax.grad(_loss)(x, q, "reference"), dtype)


def test_reference_is_a_float64_matmul_of_the_dequantized_kernel():
    kernel = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    q = qj.quantize(kernel, "nf4", 64)
    x = np.random.default_rng(1).standard_normal((5, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ np.asarray(qj.dequantize(q)).astype(np.float64)
    np.testing.assert_allclose(qj.qmatmul(jnp.asarray(x), q, path="reference"), expected, rtol=1e-5, atol=1e-5)


# -- Pallas kernels in interpret mode --------------------------------------

# `benchmarks/device_check.sh` sets QLORA_JAX_PALLAS_DEVICE=gpu (or tpu) on a machine with that accelerator: the
# kernels then run compiled on it instead of interpreted, and the other backend's cases are skipped.
_DEVICE = os.environ.get("QLORA_JAX_PALLAS_DEVICE")
_INTERPRET = _DEVICE is None


@pytest.fixture(autouse=True)
def _only_this_device(request):
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if _DEVICE is not None and backend and backend != _DEVICE:
        pytest.skip(f"QLORA_JAX_PALLAS_DEVICE={_DEVICE}: the {backend} kernels need their own hardware")

# Every format with every dtype; block sizes spread over the pairs (interpret
# mode is slow). Blocks 512 and 1024 are longer than the GPU's small-M step (256).
# By default each pair runs on one backend, and each backend sees every format, dtype and block size
# (`-m slow`: every pair on both).
_PALLAS_CASES = [(fmt, dtype, BLOCKS[(i + 2 * j) % len(BLOCKS)])
                 for i, fmt in enumerate(FORMATS) for j, dtype in enumerate(DTYPES)]
_PALLAS_DEFAULT = {("gpu", i) for i in (0, 1, 4, 5, 7, 11)} | {("tpu", i) for i in (2, 3, 6, 8, 9, 10)}


@pytest.mark.parametrize(("backend", "fmt", "dtype", "block"), [
    pytest.param(backend, *case, marks=() if (backend, i) in _PALLAS_DEFAULT else pytest.mark.slow)
    for backend in ("gpu", "tpu") for i, case in enumerate(_PALLAS_CASES)])
def test_pallas_kernels_match_reference(backend, fmt, dtype, block):
    x, q = _case(fmt, dtype, block, 1024, 256, m=(5,), double_quant=fmt != "int8")
    path = f"pallas_{backend}"
    got = qj.qmatmul(x, q, path=path, interpret=_INTERPRET)
    assert got.shape == (5, 256) and got.dtype == dtype
    _assert_close(got, qj.qmatmul(x, q, path="reference"), dtype)


@pytest.mark.parametrize(("backend", "dtype"), matrix(["gpu", "tpu"], DTYPES))
def test_pallas_forward_has_the_recomputing_gradient(backend, dtype):
    x, q = _case("nf4", dtype, 64, 512, 256, m=(3,))
    path = f"pallas_{backend}"
    g = jax.grad(_loss)(x, q, path, interpret=_INTERPRET)
    assert g.dtype == dtype
    _assert_close(g, jax.grad(_loss)(x, q, "reference"), dtype)
    _, vjp = jax.vjp(lambda x, q: qj.qmatmul(x, q, path=path, interpret=_INTERPRET), x, q)
    _, q_bar = vjp(jnp.ones((3, 256), dtype))
    assert q_bar.codes.dtype == jax.dtypes.float0 and not np.any(np.asarray(q_bar.nested_absmax))


# Shapes that are not multiples of the tile sizes: M is padded; N and K take the
# largest power-of-two tile that divides them (GPU N = 80 -> 16, K = 192 -> 64;
# TPU N = 384 -> 128, K = 768 -> 256; K = 2048 with block 1024 puts one scale per
# step on TPU, and a step inside a block on the GPU).
_TILE_SHAPES = {
    "gpu": [(37, 192, 80, 64), (300, 192, 80, 32), (5, 2048, 64, 1024)],
    "tpu": [(37, 768, 384, 64), (300, 768, 384, 128), (5, 2048, 128, 1024)],
}


@pytest.mark.parametrize(("backend", "fmt", "dtype"), matrix(["gpu", "tpu"], ["nf4", "int8"],
                                                            [jnp.float32, jnp.bfloat16]))
def test_pallas_tile_configs_and_ragged_shapes(backend, fmt, dtype):
    seen = set()
    for m, k, n, block in _TILE_SHAPES[backend]:
        x, q = _case(fmt, dtype, block, k, n, m=(m,), seed=m)
        got = qj.qmatmul(x, q, path=f"pallas_{backend}", interpret=_INTERPRET)
        _assert_close(got, qj.qmatmul(x, q, path="reference"), dtype)
        seen.add(pallas.tiles_for(backend, m, k, n, block).bm)
    small, large = (pallas.GPU_TILES if backend == "gpu" else pallas.TPU_TILES).values()
    assert seen == {small.bm, large.bm}  # both tile configs ran
    m, k, n, block = _TILE_SHAPES[backend][0]
    used = pallas.tiles_for(backend, m, k, n, block)
    assert m % used.bm and used.bn < small.bn and used.bk < small.bk  # ragged against the preferred tiles


_SAFETY = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
           export.DisabledSafetyCheck.custom_call("tpu_custom_call")]


@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_pallas_kernels_lower_for_their_hardware(backend, platform, fmt):
    """The Triton and Mosaic lowerings (run in Python, without the device) accept
    both kernels with both tile configs; the result is a Triton / Mosaic custom call."""
    q = qj.quantize(jnp.ones((2048, 512)), fmt, 64, double_quant=fmt != "int8")
    for m in (1, 512):
        for dtype in (jnp.bfloat16, jnp.float32):
            x = jax.ShapeDtypeStruct((m, 2048), dtype)
            fn = jax.jit(functools.partial(pallas.pallas_matmul, backend=backend, out_dtype=np.dtype(dtype)))
            text = export.export(fn, platforms=[platform], disabled_checks=_SAFETY)(x, q).mlir_module()
            assert ("gpu.triton" if backend == "gpu" else "tpu_custom_call") in text


# -- path selection ----------------------------------------------------------


def test_auto_path_on_cpu_is_xla_and_predicates_explain_themselves():
    x, q = _case("nf4", jnp.float32, 64, 256, 128)
    assert qj.qmatmul_path(x, q) == "xla"
    support = qj.can_use_pallas_gpu(x, q)
    assert not support and "default backend is cpu" in support.reason
    assert qj.can_use_pallas_gpu(x, q, interpret=True)
    flat = qj.quantize(jnp.ones((96, 128)), "nf4", 64)  # 96 % 64 != 0: blocks straddle rows
    assert "not a multiple of the block size 64" in qj.can_use_pallas_tpu(x[..., :96], flat, interpret=True).reason
    with pytest.raises(ValueError, match=r"path: 'pallas_gpu' cannot compute x \(2, 3, 256\) float32 @ kernel "
                                         r"\(256, 128\) \(nf4, block 64\): default backend is cpu"):
        qj.qmatmul(x, q, path="pallas_gpu")


def test_auto_path_on_gpu_uses_the_kernel_or_logs_the_fallback(monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, q = _case("nf4", jnp.float32, 64, 256, 128)
    assert qj.qmatmul_path(x, q) == "pallas_gpu"
    odd = qj.quantize(jnp.ones((256, 40)), "nf4", 64)
    with caplog.at_level(logging.WARNING, logger="qlora_jax"):
        assert qj.qmatmul_path(x, odd) == "xla"
    assert "pallas_gpu not used" in caplog.text and "output size 40 is not a multiple of 16" in caplog.text
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert qj.qmatmul_path(x, q) == "pallas_tpu"
    with caplog.at_level(logging.WARNING, logger="qlora_jax"):
        assert qj.qmatmul_path(x, qj.quantize(jnp.ones((256, 64)), "nf4", 64)) == "xla"
    assert "pallas_tpu not used" in caplog.text and "output size 64 is not a multiple of 128" in caplog.text


# -- qdot_general / qeinsum --------------------------------------------------


@pytest.mark.parametrize(("spec", "x_shape", "k_shape", "contract"), [
    ("bsd,dnh->bsnh", (2, 3, 128), (128, 4, 16), (0,)),            # LinearGeneral / attention q projection
    ("...nh,nhd->...d", (2, 3, 4, 32), (4, 32, 64), (0, 1)),        # attention output projection
    ("bd,hdk->bhk", (3, 128), (2, 128, 64), (1,)),                  # contracted axis in the middle
    ("bhd,hdk->bhk", (3, 2, 128), (2, 128, 64), (1,)),              # a batch axis shared with the kernel
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qeinsum_matches_a_float64_einsum(spec, x_shape, k_shape, contract, dtype):
    kernel = np.random.default_rng(0).standard_normal(k_shape).astype(np.float32) * 0.05
    q = qj.quantize(kernel, "nf4", 32, contract_axes=contract)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(x_shape), dtype)
    w64 = np.asarray(qj.dequantize(q, jnp.float32), np.float64)
    expected = np.einsum(spec, np.asarray(x.astype(jnp.float32), np.float64), w64)
    got = jax.jit(lambda x, q: qj.qeinsum(spec, x, q))(x, q)
    assert got.dtype == dtype
    _assert_close(got, jnp.asarray(expected, jnp.float32), dtype)
    reference = qj.qeinsum(spec, x, q, path="reference", preferred_element_type=jnp.float32)
    _assert_close(reference, jnp.asarray(expected, jnp.float32), jnp.float32)

    def loss(x, path):
        return jnp.sum(jnp.tanh(qj.qeinsum(spec, x, q, path=path).astype(jnp.float32)))

    _assert_close(jax.grad(loss)(x, "xla"), jax.grad(loss)(x, "reference"), dtype)


def test_qdot_general_plain_case_runs_the_pallas_kernel():
    q = qj.quantize(jax.random.normal(jax.random.key(0), (4, 64, 8, 16)), "nf4", 64, contract_axes=(0, 1))
    x = jax.random.normal(jax.random.key(1), (3, 4, 64))
    dims = (((1, 2), (0, 1)), ((), ()))
    got = qj.qdot_general(x, q, dims, path="pallas_gpu", interpret=True)
    ref = jnp.einsum("bij,ijkl->bkl", x, qj.dequantize(q, jnp.float32), precision="highest")
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.abs(ref).max()))
    with pytest.raises(ValueError, match=r"path: 'pallas_gpu' computes plain matmuls only"):
        qj.qeinsum("bd,hdk->bhk", x[:, 0], qj.quantize(jnp.ones((2, 64, 64)), "nf4", contract_axes=(1,)),
                   path="pallas_gpu", interpret=True)


# -- stacked layers ------------------------------------------------------------


def test_stacked_layers_slice_back_to_valid_kernels_in_scan():
    qs = [qj.quantize(jax.random.normal(jax.random.key(i), (128, 128)) * 0.1, "nf4", 64, True) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    assert stacked.stack_shape == (3,) and stacked.shape == (128, 128)
    x = jax.random.normal(jax.random.key(9), (4, 128))

    def step(h, q):
        assert q.stack_shape == () and q.shape == (128, 128)
        return jnp.tanh(qj.qmatmul(h, q)), None

    got, _ = jax.lax.scan(step, x, stacked)
    expected = x
    for q in qs:  # float64 reference, layer by layer
        w = np.asarray(qj.dequantize(q, jnp.float32), np.float64)
        expected = np.tanh(np.asarray(expected, np.float64) @ w)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -- memory: the backward pass keeps packed weights only ----------------------


def _hlo_computations(text: str) -> dict[str, str]:
    comps, name, lines = {}, None, []
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name, lines = header.group(1), []
        elif line == "}" and name:
            comps[name], name = "\n".join(lines), None
        elif name:
            lines.append(line)
    return comps


def _reaches(comps: dict[str, str], name: str, needle: str, seen: set | None = None) -> bool:
    """Whether computation `name` or one it calls contains `needle`."""
    seen = set() if seen is None else seen
    if name in seen or name not in comps:
        return False
    seen.add(name)
    if needle in comps[name]:
        return True
    return any(_reaches(comps, c, needle, seen) for c in re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)",
                                                                      comps[name]))


def _scanned_qlora_grad(matmul, layers=8, d=1024, rank=8):
    """The compiled gradient (w.r.t. the adapters) of `layers` QLoRA-style layers
    `tanh(x @ W + (x @ A) @ B)` run under `lax.scan`, W packed NF4."""
    qs = [qj.quantize(jax.random.normal(jax.random.key(i), (d, d)) * 0.03, "nf4", 64, True) for i in range(layers)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    adapters = (jnp.full((layers, d, rank), 0.01), jnp.zeros((layers, rank, d)))

    def loss(adapters, x, q):
        def layer(h, params):
            q_l, a, b = params
            return jnp.tanh(matmul(h, q_l) + (h @ a) @ b), None

        h, _ = jax.lax.scan(layer, x, (q, *adapters))
        return jnp.sum(h)

    return jax.jit(jax.grad(loss)).lower(adapters, jnp.ones((16, d)), stacked).compile()


def test_scanned_qlora_layers_keep_no_dequantized_weight_for_backward():
    """Eight 1024 x 1024 layers under scan: with qmatmul the step's temporaries stay
    below four dequantized float32 weights; plain autodiff of x @ dequantize(q)
    (built here as the control) keeps all eight. The backward loop must also
    dequantize from the packed uint8 codes itself, i.e. XLA did not merge the
    recomputation with the forward dequantization."""
    weight = 1024 * 1024 * 4
    ours = _scanned_qlora_grad(qj.qmatmul)
    naive = _scanned_qlora_grad(lambda h, q: h @ qj.dequantize(q, jnp.float32))
    ours_temp = ours.memory_analysis().temp_size_in_bytes
    naive_temp = naive.memory_analysis().temp_size_in_bytes
    assert naive_temp > 8 * weight, naive_temp / weight
    assert ours_temp < 4 * weight, ours_temp / weight
    for compiled, backward_reads_codes in ((ours, True), (naive, False)):
        text = compiled.as_text()
        comps = _hlo_computations(text)
        forward, backward = re.findall(r"body=%?([\w.\-]+)", text)
        assert _reaches(comps, forward, "u8[")
        assert _reaches(comps, backward, "u8[") == backward_reads_codes


def _mlp_grad_temp_bytes(matmul, qs, x):
    def loss(x, qs):
        h = x
        for q in qs:
            h = jnp.tanh(matmul(h, q))
        return jnp.sum(h)

    return jax.jit(jax.grad(loss)).lower(x, qs).compile().memory_analysis().temp_size_in_bytes


def test_unrolled_layers_keep_no_dequantized_weight_for_backward():
    """Four 1024 x 1024 layers in a Python loop (no scan): the dequantization is
    tied to each layer's input, so XLA does not hoist all of them to the start."""
    qs = [qj.quantize(jax.random.normal(jax.random.key(i), (1024, 1024)), "nf4", 64, True) for i in range(4)]
    x = jnp.ones((8, 1024))
    ours = _mlp_grad_temp_bytes(qj.qmatmul, qs, x)
    naive = _mlp_grad_temp_bytes(lambda h, q: h @ qj.dequantize(q, jnp.float32), qs, x)
    weight_bytes = 1024 * 1024 * 4
    assert naive >= 3 * weight_bytes, naive  # the baseline really keeps the weights
    assert ours < 1.5 * weight_bytes, (ours, naive)


@pytest.mark.parametrize("path", ["reference", "xla"])
def test_quantized_kernel_gets_a_zero_cotangent(path):
    q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4", 64, double_quant=True)
    x = jnp.ones((4, 128))
    _, vjp = jax.vjp(lambda x, q: qj.qmatmul(x, q, path=path), x, q)
    _, q_bar = vjp(jnp.ones((4, 64)))
    assert q_bar.codes.dtype == jax.dtypes.float0
    assert not np.any(np.asarray(q_bar.nested_absmax)) and not np.any(np.asarray(q_bar.nested_offset))
    plain = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "int8", 64)
    grad = jax.grad(lambda q: jnp.sum(qj.qmatmul(x, q, path=path)), allow_int=True)(plain)
    assert not np.any(np.asarray(grad.absmax))


# -- bad input ---------------------------------------------------------------


def test_bad_input_names_the_shapes():
    q = qj.quantize(jnp.ones((128, 64)), "nf4")
    with pytest.raises(ValueError, match=r"x: shape \(2, 100\) does not match the kernel's shape \(128, 64\)"):
        qj.qmatmul(jnp.ones((2, 100)), q)
    with pytest.raises(ValueError, match=r"x: dtype int32 \(shape \(2, 128\)\) is not float32, bfloat16 or float16"):
        qj.qmatmul(jnp.ones((2, 128), jnp.int32), q)
    with pytest.raises(TypeError, match=r"q: qmatmul takes a QuantizedArray \(from qj.quantize\), got ArrayImpl "
                                        r"of shape \(128, 64\)"):
        qj.qmatmul(jnp.ones((2, 128)), jnp.ones((128, 64)))
    with pytest.raises(ValueError, match=r"path: unknown path 'pallas'"):
        qj.qmatmul(jnp.ones((2, 128)), q, path="pallas")
    with pytest.raises(ValueError, match=r"q: kernel \(128, 64\) has stack dimensions \(2,\)"):
        qj.qmatmul(jnp.ones((2, 128)), jax.tree.map(lambda *a: jnp.stack(a), q, q))
    with pytest.raises(ValueError, match=r"q: qmatmul takes a 2-D kernel"):
        qj.qmatmul(jnp.ones((2, 4)), qj.quantize(jnp.ones((4, 8, 64)), "nf4", 32, contract_axes=(2,)))
    k3 = qj.quantize(jnp.ones((64, 4, 16)), "nf4", 32)
    with pytest.raises(ValueError, match=r"q: contracting kernel axes \(1,\) of shape \(64, 4, 16\), but its blocks "
                                         r"run along contract_axes \(0,\)"):
        qj.qeinsum("bn,dnh->bdh", jnp.ones((2, 4)), k3)
    with pytest.raises(ValueError, match=r"lhs: shape \(2, 3, 32\) does not match the kernel's shape \(64, 4, 16\)"):
        qj.qeinsum("bsd,dnh->bsnh", jnp.ones((2, 3, 32)), k3)
    with pytest.raises(ValueError, match=r"subscripts: 'bsd,dnh' is not of the form"):
        qj.qeinsum("bsd,dnh", jnp.ones((2, 3, 64)), k3)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [8, 1024])
def test_cpu_nibble_layouts_match_the_reference(rows, dtype, tol):
    """On CPU a 4-bit kernel is contracted as two half-width products below 1024 rows of x and as one
    permuted full-width product from 1024 rows on: both give the reference's values and input gradient."""
    q = qj.quantize(jax.random.normal(jax.random.key(0), (128, 64)), "nf4", 64, double_quant=True)
    x = jax.random.normal(jax.random.key(1), (rows, 128)).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (rows, 64)).astype(dtype)
    want, want_vjp = jax.vjp(lambda x: qj.qmatmul(x, q, path="reference"), x)
    got, got_vjp = jax.vjp(lambda x: qj.qmatmul(x, q, path="xla"), x)
    for a, b in ((got, want), (got_vjp(g)[0], want_vjp(g)[0])):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lhs", [(1, 256), (2, 3, 256), (128, 256)])
def test_cpu_chunked_small_products_match_a_float64_matmul(monkeypatch, lhs, dtype, tol):
    """Up to 128 rows of x, a large 4-bit kernel is dequantized and multiplied in chunks of output rows inside a
    loop (so that each chunk is read back from cache); shrunk chunks make a small kernel take that path."""
    # 64 output rows of 256 float32 inputs per chunk
    monkeypatch.setattr(importlib.import_module("qlora_jax._src.ops.qmatmul"), "_CHUNK_BYTES", 64 * 256 * 4)
    q = qj.quantize(jax.random.normal(jax.random.key(0), (256, 512)), "nf4", 64, double_quant=True)
    x = jax.random.normal(jax.random.key(1), lhs).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (*lhs[:-1], 512)).astype(dtype)
    fn = jax.jit(lambda x: qj.qmatmul(x, q))
    assert re.search(r"\bwhile\b", fn.lower(x).as_text())  # the chunk loop ran: 8 chunks of 64 rows
    w = np.asarray(qj.dequantize(q, jnp.float32), np.float64)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ w
    got, vjp = jax.vjp(fn, x)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max())
    want_grad = np.asarray(g.astype(jnp.float32), np.float64) @ w.T
    np.testing.assert_allclose(np.asarray(vjp(g)[0], np.float64), want_grad, rtol=0, atol=tol * np.abs(want_grad).max())


def test_cpu_chunked_products_only_for_few_rows_and_large_kernels():
    """The chunk loop is for decoding-sized x and kernels larger than one chunk; otherwise one piece."""
    big = qj.quantize(jnp.ones((4096, 4096)), "nf4", 64)  # 64 MiB as float32: 8 chunks of 512 rows
    small = qj.quantize(jnp.ones((256, 512)), "nf4", 64)

    def loops(x, q):
        return len(re.findall(r"\bwhile\b", jax.jit(lambda x: qj.qmatmul(x, q)).lower(x).as_text()))

    assert loops(jnp.ones((4, 4096)), big) == 1
    assert loops(jnp.ones((129, 4096)), big) == 0  # more rows of x: the product dominates
    assert loops(jnp.ones((4, 256)), small) == 0  # the whole kernel fits in one chunk
