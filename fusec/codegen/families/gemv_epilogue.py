"""Matrix-vector products with fused epilogues (decode): ``MUL_MAT`` -> bias/residual ``ADD`` (and any
chain of broadcast binary ops), and the FFN gate/up pair ``MUL_MAT(wg, x), MUL_MAT(wu, x) ->
SWIGLU/GEGLU``.

Only FUSED nodes with ``params["kernel"] == "gemv_epilogue"`` are rendered here (patterns in
``patterns/gemv.fuse``). :func:`plan` walks the decomposition into a :class:`GemvPlan`: one or two
MUL_MATs sharing their vector operand ``x`` (ggml_mul_mat with ``x`` a single row, ``ne = [K, 1, 1,
1]``), then optionally SWIGLU/GEGLU of the two products (ggml_swiglu_split / ggml_geglu_split,
``swapped = false``), then a chain of MUL/ADD/SUB/DIV with operands that broadcast along the output
row (ggml_can_repeat). :func:`tune` picks the vector width and how many threads share one output
row; the template reads every weight row once with the widest aligned loads (16 bytes: 8 halves or 4
floats), accumulates in f32, reduces per row and applies the epilogue in registers, so the only
DRAM traffic is the weights, ``x`` (from cache after the first warp) and the output row.

Three kernel bodies (:class:`Tuning`): the classic one (``common/gemv_epilogue.c.j2``, all backends:
one row per ``tpr`` threads, ``unroll`` loads per weight issued before their FMAs, one row group per
workgroup); on CUDA the streaming one (``cuda/gemv_epilogue_stream.cu.j2``, ``stream=True``):
each row slot walks several rows (a persistent grid of ``persist`` blocks per SM, rows split evenly
over the slots) and issues the loads of its next chunk -- of the same row or of its next row --
before the FMAs of the current chunk and before the row's reduction, so loads stay in flight with
no ramp or tail per row; weight loads may carry a streaming cache hint (``ld``); and on CUDA the
x-in-registers one (``cuda/gemv_epilogue_xreg.cu.j2``, ``xrows > 0``): a block holds x in registers
per K segment and streams ``xrows`` weight rows through it, so x is read once per block instead of
once per weight vector (for K = 8192 the classic body moves twice the weight bytes of f32 x through
L1). :func:`tune` picks per backend, dtype and K from H200 measurements (``bench/bench_gemv.py``).
In the classic and x-in-registers bodies the epilogue operands are loaded by the finishing thread
before the dot product (the streaming body loads them after its row's reduction).

The x-in-registers body is launched with programmatic dependent launch (``Kernel.meta["pdl"]``;
:mod:`fusec.backends.cuda_runtime`): it lets the next kernel launch at once
(``griddepcontrol.launch_dependents``), issues its first weight loads, and only then waits for the
previous kernel (``griddepcontrol.wait``) before reading x or the epilogue operands, so a GEMV's weight
stream starts while the kernel before it drains.

Shapes, strides and offsets are runtime parameters; the source depends on the dtypes, the plan and
the tuning only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.dtypes import DType
from ...ir.tensor import Tensor
from .. import family
from ..env import CUDA_SMS, TYPE_NAMES, render
from ..epilogue import EPILOGUE_OPS, fused_input_index, walk_epilogue
from ..kernel import Binding, Kernel
from ..layout import elem_offset, elem_strides, layout_params

TEMPLATES = {"wgsl": "wgsl/gemv_epilogue.wgsl.j2", "cuda": "cuda/gemv_epilogue.cu.j2",
             "msl": "msl/gemv_epilogue.metal.j2"}
GLU_ACT = {"SWIGLU": "silu", "GEGLU": "gelu"}
SIMD = 32  # warp / simdgroup width the CUDA and MSL templates assume
MAX_GRID = 65535
MAX_TPR = {"wgsl": 256, "cuda": 256, "msl": 256}
WG_THREADS = {"wgsl": 64, "cuda": 128, "msl": 128}  # threads per workgroup when rows share one
TARGET_THREADS = {"wgsl": 16384, "cuda": CUDA_SMS * 1024, "msl": 16384}  # threads wanted in flight
UNROLL = 4  # weight vectors each thread loads before using them (bytes in flight per thread)
LOAD_HINTS = ("", "cs", "na")  # weight loads: plain, __ldcs (evict-first), ld.global.nc.L1::no_allocate.L2::256B
STREAM_WARPS_PER_SM = 16  # streaming body: resident warps wanted per SM (persist = this / warps per block)
STREAM_MIN_WARPS = CUDA_SMS * 8  # streaming body: split K over more threads while fewer row warps exist
XREG_MIN_K = 2048  # CUDA, 16-byte weight vectors: rows at least this long take the x-in-registers body
XREG_THREADS, XREG_ROWS = 256, 8  # tune_xreg's defaults (tune() derives its own from the row length)
XREG_MAX_XVECS = 8  # its x vectors per thread and K segment (8 x 8 floats: 64 registers)
XREG_LOADS = 4  # tune(): weight vectors per thread and row group (unroll x xvecs)
XREG_ROW_VECS = 8  # tune(): rows per block x x vectors per thread (xrows x xvecs)
XREG_MAX_NVEC = 1024  # tune_xreg_for's range: rows of at most this many 16-byte vectors (K = 8192 f16, 4096 f32)
STREAM_UNROLL = {1: 8, 2: 4}  # streaming body: loads per weight and thread per chunk, by weight count


@dataclass(frozen=True)
class Step:
    """``y = y <op> src[operand][i % ne0]`` (the operand broadcast along the output row)."""

    op: str
    operand: int

    @property
    def symbol(self) -> str:
        return EPILOGUE_OPS[self.op]


@dataclass(frozen=True)
class GemvPlan:
    """``acc_j = dot(src[weights[j]][row, :], src[x])`` for each weight, then ``glu`` (``act(acc_0) *
    acc_1``; ``None`` with one weight) and ``steps`` in order."""

    weights: tuple[int, ...]
    x: int
    glu: str | None  # SWIGLU | GEGLU | None
    steps: tuple[Step, ...]

    @property
    def operands(self) -> list[int]:
        return sorted({s.operand for s in self.steps})

    @property
    def inputs(self) -> list[int]:
        """Source indices the kernel binds, ascending (binding ``src<i>``)."""
        return sorted({*self.weights, self.x, *self.operands})

    @property
    def name(self) -> str:
        parts = ["mul_mat"] * len(self.weights)
        if self.glu:
            parts = ["gate_up", self.glu.lower()]
        return "_".join(parts + [s.op.lower() for s in self.steps])

    def describe(self) -> str:
        mm = [f"MUL_MAT(src{w}, src{self.x})" for w in self.weights]
        head = f"{self.glu}({', '.join(mm)})" if self.glu else mm[0]
        return " -> ".join([head] + [f"{s.op}(src{s.operand})" for s in self.steps])


@dataclass(frozen=True)
class Tuning:
    """Vector width (elements per weight load), threads per output row (power of two), output rows
    per workgroup, weight vectors loaded per thread before use.

    CUDA only: ``stream`` selects the streaming body (the next chunk's loads issued before the
    current chunk's FMAs and row reduction; needs ``tpr >= 32``); ``persist`` > 0 (with ``stream``)
    makes its grid persistent, ``persist`` blocks per SM (``__launch_bounds__`` min blocks), each row
    slot looping over ``ceil(row groups / grid)`` rows; ``ld`` is the weight-load cache hint of the
    streaming body: ``""`` plain, ``"cs"`` ``__ldcs``, ``"na"`` ``ld.global.nc.L1::no_allocate.L2::256B``.

    CUDA only: ``xrows`` > 0 selects the x-in-registers body (``cuda/gemv_epilogue_xreg.cu.j2``):
    a block of ``tpr`` threads (``rows`` = 1) computes ``xrows`` consecutive rows; each thread holds
    ``xvecs`` vectors of x in registers per K segment and streams the block's weight rows through
    them, ``unroll`` rows' loads issued together (``ld`` is its load hint too); ``xspread``: block
    ``b`` of ``nb`` takes rows ``b, b + nb, b + 2 nb, ...`` instead of ``xrows`` consecutive ones (the
    grid streams one contiguous region of the weights at a time); ``xpf``: before waiting for the
    previous kernel (programmatic dependent launch), each block asks the L2 for its rows' weights
    (``cp.async.bulk.prefetch.L2``; 16-byte weight vectors only). Kernels of this body carry
    ``meta["pdl"]``: the CUDA runtime launches them with programmatic stream serialization."""

    vec: int
    tpr: int
    rows: int
    unroll: int = UNROLL
    stream: bool = False
    persist: int = 0
    ld: str = ""
    xrows: int = 0
    xvecs: int = 0
    xspread: bool = False
    xpf: bool = False

    @property
    def workgroup(self) -> int:
        return self.tpr * self.rows


def _fail(node: Tensor, msg: str) -> CodegenError:
    return CodegenError(f"node {node.name!r}: gemv_epilogue cannot render it: {msg}")


def plan(node: Tensor) -> GemvPlan:
    """The :class:`GemvPlan` of a FUSED ``gemv_epilogue`` node.

    The decomposition must be: one MUL_MAT, or two MUL_MATs followed by SWIGLU/GEGLU of both
    (split form, not swapped; gate = the GLU's ``src[0]``); each MUL_MAT reads two fused inputs, the
    same ``x`` (f32, one contiguous row ``ne = [K, 1, 1, 1]``) and a weight (f32/f16, 2-D ``ne = [K,
    M]``, contiguous rows); then MUL/ADD/SUB/DIV ops combining the running value with a fused input
    that broadcasts to the ``[M, 1, 1, 1]`` output row. Raises :class:`CodegenError` naming the node
    otherwise.
    """
    if node.op != "FUSED" or node.decomposition is None:
        raise _fail(node, f"op {node.op} is not a FUSED node with a decomposition")
    ops = node.decomposition.ops
    mms = []
    while len(mms) < len(ops) and ops[len(mms)].op == "MUL_MAT":
        mms.append(ops[len(mms)])
    if len(mms) not in (1, 2):
        raise _fail(node, f"the decomposition must start with one or two MUL_MATs, found {len(mms)}")
    rest = ops[len(mms):]
    x_idx = None
    weights = []
    for mm in mms:
        w, x = fused_input_index(mm.src[0]), fused_input_index(mm.src[1])
        if w is None or x is None:
            raise _fail(node, f"MUL_MAT ({mm.name!r}) must multiply two fused inputs")
        if x_idx is not None and x != x_idx:
            raise _fail(node, f"the MUL_MATs must share their vector operand (src[1]); {mm.name!r} does not")
        x_idx = x
        weights.append(w)
        xt, wt = mm.src[1], mm.src[0]
        if xt.dtype != DType.F32 or wt.dtype not in (DType.F32, DType.F16):
            raise _fail(node, f"MUL_MAT ({mm.name!r}) needs f32/f16 weights and an f32 vector, got "
                              f"{wt.dtype} x {xt.dtype}")
        if tuple(xt.ne[1:]) != (1, 1, 1) or tuple(wt.ne[2:]) != (1, 1):
            raise _fail(node, f"MUL_MAT ({mm.name!r}) is not a matrix-vector product: weight ne={list(wt.ne)}, "
                              f"vector ne={list(xt.ne)} (needs [K, M, 1, 1] x [K, 1, 1, 1])")
        if elem_strides(wt)[0] != 1 or elem_strides(xt)[0] != 1:
            raise _fail(node, f"MUL_MAT ({mm.name!r}) operands need contiguous rows (nb0 = element size)")
    if len(mms) == 2 and tuple(mms[0].ne) != tuple(mms[1].ne):
        raise _fail(node, "the two MUL_MATs have different output shapes")
    running = mms[0]
    glu = None
    if len(mms) == 2:
        if not rest or rest[0].op not in GLU_ACT:
            raise _fail(node, "two MUL_MATs must be followed by SWIGLU or GEGLU of both")
        g = rest[0]
        if g.params.get("swapped") or len(g.src) != 2 or g.src[1] is None:
            raise _fail(node, f"{g.op} ({g.name!r}) must be the split, non-swapped form")
        if g.src[0] is mms[0] and g.src[1] is mms[1]:
            pass
        elif g.src[0] is mms[1] and g.src[1] is mms[0]:
            weights.reverse()
        else:
            raise _fail(node, f"{g.op} ({g.name!r}) must combine the two MUL_MATs (gate, up)")
        glu = g.op
        running = g
        rest = rest[1:]
    walked, running = walk_epilogue(rest, running, lambda msg: _fail(node, msg))
    for op, other in walked:
        if other.dtype not in (DType.F32, DType.F16):
            raise _fail(node, f"{op} operand {other!r} dtype {other.dtype} is not f32/f16")
    steps = [Step(op, fused_input_index(other)) for op, other in walked]
    if node.decomposition.outputs[0] is not running:
        raise _fail(node, "the decomposition's output is not the end of the MUL_MAT epilogue")
    return GemvPlan(tuple(weights), int(x_idx), glu, tuple(steps))  # type: ignore[arg-type]


def _vec_ok(t: Tensor, v: int) -> bool:
    """Rows of ``t`` read as aligned ``v``-vectors: ``ne0``, row strides and offset multiples of ``v``."""
    nb = elem_strides(t)
    return (t.ne[0] % v == 0 and nb[0] == 1 and elem_offset(t) % v == 0
            and all(nb[i] % v == 0 for i in (1, 2, 3) if t.ne[i] > 1))


def _pow2floor(v: int) -> int:
    return 1 << max(0, v.bit_length() - 1)


def _vec(node: Tensor, p: GemvPlan, backend: str) -> int:
    ws = [node.src[i] for i in p.weights]
    x = node.src[p.x]
    if (backend == "cuda" and all(w.dtype == DType.F16 for w in ws) and all(_vec_ok(w, 8) for w in ws)
            and _vec_ok(x, 4)):
        return 8
    if all(_vec_ok(w, 4) for w in ws) and _vec_ok(x, 4):
        return 4
    return 1


def tune(node: Tensor, p: GemvPlan, backend: str) -> Tuning:
    """Vector width: 8 halves (16 bytes) on CUDA when every weight is f16 and 8-aligned (and ``x``
    4-aligned), else 4 (16-byte f32 / 8-byte f16 loads) when weights and ``x`` are 4-aligned, else 1.

    CUDA with 16-byte weight vectors (f16 x 8, f32 x 4) and rows of ``K >= XREG_MIN_K`` and at most
    ``XREG_MAX_NVEC`` vectors (the measured range): the x-in-registers body with PDL
    (:func:`tune_xreg_for`). Other CUDA f32 weights: the streaming body on a persistent grid
    (:func:`_tune_stream`); longer f16 rows: the x-in-registers body in K segments
    (:func:`tune_xreg`'s defaults); otherwise (WGSL, MSL, short or unaligned rows) the classic body
    (:func:`tune_classic`). From the H200 sweeps (bench/results/2026-11-21-h200-gemv-v9.json,
    steady state: graph replays back to back, % of the copy ceiling): FFN down 8192 -> 2048 90.2 %
    (x-in-registers, 256 threads, 2 rows per block) vs 81.1 % (8 rows per block, the previous default)
    and 64.8 % classic; gate/up 2048 -> 2 x 8192 92.6 % (128 threads, 4 rows) vs 86.1 % classic; f32
    gate/up 96.6 % vs 90.7 % streaming."""
    w = node.src[p.weights[0]]
    vec = _vec(node, p, backend)
    nvec = -(-w.ne[0] // vec)
    if backend == "cuda" and vec * w.dtype.size == 16 and w.ne[0] >= XREG_MIN_K and nvec <= XREG_MAX_NVEC:
        return tune_xreg_for(vec, nvec)
    if backend == "cuda" and all(node.src[i].dtype == DType.F32 for i in p.weights):
        return _tune_stream(vec, nvec, w.ne[1], len(p.weights))
    if backend == "cuda" and vec == 8 and w.ne[0] >= XREG_MIN_K:  # longer f16 rows: x in registers, segments
        return tune_xreg(8, nvec)
    return tune_classic(node, p, backend)


def tune_xreg_for(vec: int, nvec: int) -> Tuning:
    """The x-in-registers tuning :func:`tune` derives from the row length (``nvec`` ``vec``-vectors):
    threads ``tpr = nvec / 2`` clamped to 32..256 (each thread holds ``xvecs = nvec / tpr`` x vectors:
    2 for K = 2048 f16, 4 for K = 8192), ``XREG_LOADS`` weight vectors per row group (``unroll = 4 /
    xvecs`` rows) and ``xrows = XREG_ROW_VECS / xvecs`` rows per block: registers stay at about
    2 groups x 4 vectors + x + accumulators whatever K, so several blocks fit an SM and a next kernel's
    blocks find room while this one drains."""
    tpr = 1 << max(5, min(8, (max(1, nvec // 2)).bit_length() - 1))
    xvecs = max(1, min(XREG_MAX_XVECS, -(-nvec // tpr)))
    return tune_xreg(vec, nvec, tpr, max(1, XREG_ROW_VECS // xvecs), max(1, XREG_LOADS // xvecs))


def tune_xreg(vec: int, nvec: int, tpr: int = XREG_THREADS, xrows: int = XREG_ROWS, unroll: int = 1,
              ld: str = "na", spread: bool = False, pf: bool = False) -> Tuning:
    """The x-in-registers body's tuning (CUDA) for rows of ``nvec`` ``vec``-vectors: ``tpr`` threads,
    ``xrows`` rows per block, ``unroll`` rows' loads together; each thread holds enough x vectors to
    cover a row in one segment, at most ``XREG_MAX_XVECS`` (longer rows take several segments)."""
    xvecs = max(1, min(XREG_MAX_XVECS, -(-nvec // tpr)))
    return Tuning(vec, tpr, 1, unroll, xrows=xrows, xvecs=xvecs, ld=ld, xspread=spread, xpf=pf)


def tune_classic(node: Tensor, p: GemvPlan, backend: str) -> Tuning:
    """The classic body's tuning (every backend; tune()'s choice on WGSL / MSL, kept on CUDA for
    comparison): threads per row 32 (one warp or simdgroup per row, several rows per workgroup)
    unless there are too few rows to keep ``TARGET_THREADS`` threads busy; then up to ``MAX_TPR``
    threads split K, as long as each keeps at least ``unroll`` vectors."""
    vec = _vec(node, p, backend)
    K, M = node.src[p.weights[0]].ne[0], node.src[p.weights[0]].ne[1]
    nvec = -(-K // vec)
    tpr = SIMD
    while (tpr < MAX_TPR[backend] and M * tpr < TARGET_THREADS[backend]
           and nvec >= 2 * tpr * UNROLL):
        tpr *= 2
    if backend == "wgsl":
        tpr = max(tpr, 64) if nvec >= 64 else tpr
    rows = max(1, WG_THREADS[backend] // tpr) if tpr <= SIMD else 1
    return Tuning(vec, tpr, rows)


def _tune_stream(vec: int, nvec: int, M: int, nw: int) -> Tuning:
    """CUDA streaming tuning for ``M`` rows of ``nvec`` vectors and ``nw`` weights: one warp per row
    (4 rows per 128-thread block) while that gives ``STREAM_MIN_WARPS`` warps; else split K over up to
    ``MAX_TPR`` threads per row (one row per block, shared-memory reduce) while each thread keeps 2+
    vectors. ``unroll``: ``STREAM_UNROLL`` (8 loads per thread for one weight, 4 per weight for the
    gate/up pair: 128 B per weight slice in flight per thread, twice with the next chunk's loads, ~64
    data registers), less when the row is shorter. ``persist``: ``STREAM_WARPS_PER_SM`` warps per SM.
    Weight loads ``na`` (no L1 allocation: x stays in L1)."""
    tpr = SIMD
    while tpr < MAX_TPR["cuda"] and M * tpr // SIMD < STREAM_MIN_WARPS and nvec >= 4 * tpr:
        tpr *= 2
    unroll = max(1, min(STREAM_UNROLL[nw], _pow2floor(max(1, nvec // tpr))))
    rows = WG_THREADS["cuda"] // tpr if tpr <= SIMD else 1
    persist = max(1, STREAM_WARPS_PER_SM * SIMD // (tpr * rows))
    return Tuning(vec, tpr, rows, unroll, stream=True, persist=persist, ld="na")


def _grid(nwg: int) -> tuple[int, int, int]:
    gx = min(nwg, MAX_GRID)
    return (gx, -(-nwg // gx), 1)


def _persistent_grid(nwg: int, blocks: int) -> tuple[int, int, int]:
    """At most ``blocks`` blocks (and ``MAX_GRID``) with every row slot given the same number of row
    groups, ``ceil(nwg / grid)`` (the last slots fewer when ``nwg`` is not a multiple)."""
    per = max(1, -(-nwg // max(1, min(blocks, MAX_GRID))))
    return (max(1, -(-nwg // per)), 1, 1)


def _entry(p: GemvPlan, node: Tensor, tu: Tuning) -> str:
    wdt = "_".join(sorted({str(node.src[i].dtype) for i in p.weights}))
    odt = "_".join(sorted({str(node.src[i].dtype) for i in p.operands}))
    name = f"gemv_{p.name}_{wdt}{('_' + odt) if odt else ''}_v{tu.vec}_t{tu.tpr}"
    name += (f"_r{tu.rows}" if tu.rows > 1 else "") + f"_u{tu.unroll}"
    if tu.stream:
        name += "_s" + (f"_p{tu.persist}" if tu.persist else "") + (f"_{tu.ld}" if tu.ld else "")
    if tu.xrows:
        name += f"_x{tu.xrows}v{tu.xvecs}" + ("s" if tu.xspread else "") + ("p" if tu.xpf else "")
        name += f"_{tu.ld}" if tu.ld else ""
    return name


@family("gemv_epilogue")
def emit_gemv_epilogue(node: Tensor, backend: str) -> Kernel:
    """Kernel for a FUSED ``gemv_epilogue`` node (:func:`plan`), for ``backend`` ``wgsl`` | ``cuda`` | ``msl``.

    Tensors (ggml ``ne`` order): weights ``src[w]`` f32/f16 ``ne = [K, M, 1, 1]`` with contiguous rows
    (any row stride ``nb1``); ``x = src[plan.x]`` f32 ``ne = [K, 1, 1, 1]``; epilogue operands f32/f16
    with ``ne = [d, 1, 1, 1]``, ``M % d == 0`` (element ``i`` reads ``i % d``); result ``dst`` f32
    ``ne = [M, 1, 1, 1]``: ``dst[i] = epilogue(sum_k w[i][k] * x[k])`` (ggml_mul_mat, then
    ggml_swiglu_split / ggml_geglu_split and ggml_add/mul/sub/div), f32 accumulation, f16 weights
    widened exactly. Bindings ``src<i>`` (used sources, ascending) then ``dst``; params
    ``src<i>_ne0..3/_nb0..3/_offs``, ``dst_ne0..3/_nb0..3/_offs`` (elements) and ``grid_x``.
    Raises :class:`CodegenError` for a node :func:`plan` rejects.
    """
    return build(node, backend)


def _check_tuning(node: Tensor, tu: Tuning, backend: str, wsize: int) -> None:
    def bad(msg: str) -> CodegenError:
        return CodegenError(f"node {node.name!r}: gemv_epilogue tuning {tu}: {msg}")

    if tu.tpr > SIMD and tu.rows != 1:
        raise bad(f"several rows per workgroup need tpr <= {SIMD}")
    if tu.unroll < 1 or tu.rows < 1 or tu.tpr < 1 or tu.tpr & (tu.tpr - 1):
        raise bad("tpr must be a power of two, rows and unroll >= 1")
    if tu.ld not in LOAD_HINTS:
        raise bad(f"ld must be one of {LOAD_HINTS}")
    if tu.persist and not tu.stream or tu.ld and not (tu.stream or tu.xrows):
        raise bad("persist and ld need the streaming body (stream=True); ld also works with the x-in-registers body")
    if tu.xrows:
        if backend != "cuda":
            raise bad(f"the x-in-registers body (xrows) is CUDA only, not {backend}")
        if tu.stream or tu.rows != 1 or tu.xvecs < 1 or not 1 <= tu.unroll <= tu.xrows:
            raise bad("the x-in-registers body needs stream=False, rows=1, xvecs >= 1, 1 <= unroll <= xrows")
        if not SIMD <= tu.tpr <= 1024:
            raise bad(f"the x-in-registers body needs {SIMD} <= tpr <= 1024")
        if tu.xpf and tu.vec * wsize != 16:
            raise bad("xpf (L2 prefetch of whole rows) needs 16-byte weight vectors")
    elif tu.xvecs or tu.xspread or tu.xpf:
        raise bad("xvecs, xspread and xpf need xrows > 0")
    if tu.stream and backend != "cuda":
        raise bad(f"the streaming body is CUDA only, not {backend}")
    if tu.stream and (tu.tpr < SIMD or tu.tpr > MAX_TPR[backend]):
        raise bad(f"the streaming body needs {SIMD} <= tpr <= {MAX_TPR[backend]}")
    if tu.persist < 0:
        raise bad("persist must be >= 0")


def build(node: Tensor, backend: str, tuning: Tuning | None = None, sms: int = CUDA_SMS) -> Kernel:
    """:func:`emit_gemv_epilogue` with the tuning open (benchmarks compare variants); ``sms``: the SM
    count a persistent grid (``tuning.persist`` blocks per SM) is sized for. Raises
    :class:`CodegenError` for a node :func:`plan` rejects or a tuning the backend cannot render
    (``tpr`` not a power of two, several rows with ``tpr > 32``, ``stream``/``persist``/``ld`` off
    CUDA, ``persist``/``ld`` without ``stream``, an unknown ``ld``)."""
    p = plan(node)
    tu = tuning or tune(node, p, backend)
    _check_tuning(node, tu, backend, node.src[p.weights[0]].dtype.size)
    M = node.src[p.weights[0]].ne[1]
    types = TYPE_NAMES[backend]
    bindings = [Binding(f"src{i}", node.src[i], node.src[i].dtype) for i in p.inputs]
    bindings.append(Binding("dst", node, node.dtype, write=True))
    nwg = -(-M // (tu.xrows or tu.rows))
    grid = _persistent_grid(nwg, tu.persist * sms) if tu.persist else _grid(nwg)
    params = []
    for i in p.inputs:
        params += layout_params(f"src{i}", node.src[i])
    params += layout_params("dst", node)
    params.append(("grid_x", "u32", grid[0]))
    entry = _entry(p, node, tu)
    names = [node.name] + [f"{t.name} ({t.op})" for t in node.decomposition.ops]  # type: ignore[union-attr]
    weights = [f"src{i}" for i in p.weights]
    source = render(
        TEMPLATES[backend], entry=entry, family="gemv_epilogue", what=p.describe(), nodes=names,
        weights=weights, x=f"src{p.x}", act=GLU_ACT.get(p.glu or ""),
        steps=[{"sym": s.symbol, "src": f"src{s.operand}"} for s in p.steps],
        bindings=bindings, types={b.name: types[b.dtype] for b in bindings}, params=params,
        V=tu.vec, TPR=tu.tpr, R=tu.rows, UNROLL=tu.unroll, SIMD=SIMD,
        STREAM=tu.stream, PERSIST=tu.persist, LD=tu.ld, XROWS=tu.xrows, XVECS=tu.xvecs, XSPREAD=tu.xspread, XPF=tu.xpf,
    )
    return Kernel(backend, "gemv_epilogue", entry, source, bindings, params, (tu.workgroup, 1, 1), grid, node,
                  meta={"plan": p, "tuning": tu, "pdl": bool(tu.xrows)})


__all__ = ["GemvPlan", "Step", "Tuning", "build", "emit_gemv_epilogue", "plan", "tune", "tune_classic", "tune_xreg",
           "tune_xreg_for"]
