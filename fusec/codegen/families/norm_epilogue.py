"""Row norm + element-wise epilogue kernels: RMS_NORM / NORM, optionally followed by a chain of
binary MUL/ADD/SUB/DIV ops whose other operands broadcast to the row (ggml_can_repeat).

One mechanism serves the plain ggml ops (``ggml_rms_norm``, ``ggml_norm``: empty chain) and every
FUSED node with ``params["kernel"] == "norm_epilogue"`` (``rms_norm_mul``, ``rms_norm_mul_add``,
``norm_mul_add``, ...): :func:`plan` walks the node's decomposition into a :class:`NormPlan`,
:func:`tune` picks the launch shape and the template renders the plan. The generated source depends
only on dtypes, the chain, the tuning (vector width, threads per row, rows per workgroup,
register slots; CUDA: persistent grid, next-row prefetch, streaming hints; the tuning follows the
row length and, on CUDA, the class of the row count) and, on CUDA, the layout class (dense rows,
operands that are one row or span the row: :func:`_layout`); shapes, strides, offsets and eps are
runtime parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import CodegenError
from ...ir.shape import can_repeat
from ...ir.tensor import Tensor
from .. import family
from ..env import CUDA_SMS, TYPE_NAMES, render
from ..epilogue import EPILOGUE_OPS, fused_input_index, walk_epilogue
from ..kernel import Binding, Kernel
from ..layout import elem_offset, elem_strides, layout_params

TEMPLATES = {"wgsl": "wgsl/norm_epilogue.wgsl.j2", "cuda": "cuda/norm_epilogue.cu.j2",
             "msl": "msl/norm_epilogue.metal.j2"}
NORM_OPS = ("RMS_NORM", "NORM")
MAX_TPR = {"wgsl": 256, "cuda": 1024, "msl": 1024}  # threads per row (workgroup size limit)
MIN_WG = {"wgsl": 64, "cuda": 128, "msl": 128}
# preferred largest workgroup for a row that fits in registers: beyond it each thread takes more slots
# (CUDA: 512-thread blocks of ~48 registers leave 2 blocks = 1024 threads per SM; 256-thread blocks
# with 8 slots kept rows of 8192 f32 at 95 % of the copy ceiling against 90 %, H200 2026-11-21)
PREF_TPR = {"wgsl": 256, "cuda": 256, "msl": 1024}  # short rows: pack rows until a workgroup has this many threads
SIMD = 32  # warp / simdgroup width assumed by the CUDA and MSL templates
MAX_CACHED_FLOATS = 32  # WGSL/MSL: per-thread budget (f32 registers) for keeping the row of x resident
MAX_GRID = 65535


@dataclass(frozen=True)
class EpilogueStep:
    """``y = y <op> src[operand]`` with ``src[operand]`` broadcast to the row (ggml ``i % ne``)."""

    op: str  # MUL | ADD | SUB | DIV
    operand: int  # index into the node's src

    @property
    def symbol(self) -> str:
        return EPILOGUE_OPS[self.op]


@dataclass(frozen=True)
class Prologue:
    """``x = src[x] + src[operand]`` before the norm (ggml_add, ``src[operand]`` broadcast to the row
    with ``i % ne``), rounded to x's dtype as ggml stores the sum; written as the FUSED node's output
    ``output`` (multi-output fusion) when ``output`` is not None."""

    operand: int
    output: int | None


@dataclass(frozen=True)
class NormPlan:
    """What the kernel computes: ``norm(src[x], eps)`` then ``steps`` in order; with a
    :class:`Prologue`, the norm reads ``src[x] + src[prologue.operand]`` instead of ``src[x]``."""

    norm: str  # RMS_NORM | NORM
    x: int
    eps: float
    steps: tuple[EpilogueStep, ...]
    prologue: Prologue | None = None

    @property
    def inputs(self) -> list[int]:
        """Source indices the kernel reads, ascending (each becomes binding ``src<i>``)."""
        pre = [self.prologue.operand] if self.prologue else []
        return sorted({self.x, *pre, *(s.operand for s in self.steps)})

    @property
    def name(self) -> str:
        """Chain name in ggml vocabulary, e.g. ``rms_norm_mul_add``, ``add_rms_norm_mul``."""
        return "_".join((["add"] if self.prologue else []) + [self.norm.lower()] + [s.op.lower() for s in self.steps])

    def describe(self) -> str:
        x = f"ADD(src{self.x}, src{self.prologue.operand})" if self.prologue else f"src{self.x}"
        if self.prologue and self.prologue.output is not None:
            x += f" [output {self.prologue.output}]"
        parts = [f"{self.norm}({x})"] + [f"{s.op}(src{s.operand})" for s in self.steps]
        return " -> ".join(parts)


@dataclass(frozen=True)
class Tuning:
    """Launch shape baked into the source: vector width, threads per row (power of two, >= 32),
    rows per workgroup, register slots per thread (0: stream the row from memory in each pass).
    CUDA only: ``persist`` > 0 makes the grid persistent (about ``persist`` one-row blocks per SM,
    each looping over rows with a grid stride; needs a resident row and no prologue), ``pn`` loads
    the next row before the current row's reduction (persistent, or WGSL ``seq``), ``cs`` uses
    cache-streaming loads (x, per-row operands) and stores. WGSL only: ``seq`` > 1 makes each
    one-row workgroup compute ``seq`` consecutive rows one after another (resident row, no prologue)."""

    vec: int
    tpr: int
    rows: int
    slots: int
    persist: int = 0
    pn: bool = False
    cs: bool = False
    seq: int = 0

    @property
    def workgroup(self) -> int:
        return self.tpr * self.rows


def _fail(node: Tensor, msg: str) -> CodegenError:
    return CodegenError(f"node {node.name!r}: norm_epilogue cannot render it: {msg}")


def plan(node: Tensor) -> NormPlan:
    """The :class:`NormPlan` of a RMS_NORM / NORM node or of a FUSED ``norm_epilogue`` node.

    A FUSED node's decomposition must be a chain: optionally an ADD of two placeholders (the
    prologue: one of them has the sum's shape, the other broadcasts to it, ggml_can_repeat), then
    RMS_NORM or NORM of that sum or of a placeholder, then binary MUL/ADD/SUB/DIV ops each taking the
    previous value and one placeholder (on either side for the commutative MUL/ADD, as ``src[0]`` for
    SUB/DIV), the placeholder broadcastable to the row (ggml_can_repeat) and the result keeping the
    row's shape. Output 0 of the decomposition is the end of the chain; the prologue's sum may be one
    more output (multi-output fusion: the kernel writes it too); no other value may be an output.
    Raises :class:`CodegenError` naming the node otherwise.
    """
    if node.op in NORM_OPS:
        return NormPlan(node.op, 0, float(node.params.get("eps", 0.0)), ())
    if node.op != "FUSED" or node.decomposition is None:
        raise _fail(node, f"op {node.op} is not RMS_NORM, NORM or a FUSED norm chain")
    sub = node.decomposition
    ops = sub.ops
    prologue: Prologue | None = None
    pre_add: Tensor | None = None
    if len(ops) >= 2 and ops[0].op == "ADD" and ops[1].op in NORM_OPS and ops[1].src[0] is ops[0]:
        pre_add, ops = ops[0], ops[1:]
        a, b = pre_add.src
        ia, ib = fused_input_index(a), fused_input_index(b)
        if ia is None or ib is None:
            raise _fail(node, f"the ADD before {ops[0].op} must add two fused inputs")
        if tuple(a.ne) != tuple(pre_add.ne) and tuple(b.ne) == tuple(pre_add.ne):
            a, b, ia, ib = b, a, ib, ia  # the operand spanning the row is x; the other broadcasts
        if tuple(a.ne) != tuple(pre_add.ne) or not can_repeat(b.ne, a.ne) or a.dtype != b.dtype:
            raise _fail(node, f"the ADD before {ops[0].op} must add two fused inputs of one dtype, one broadcast "
                        f"to the other (ne={list(a.ne)}, ne={list(b.ne)})")
        if pre_add.dtype != a.dtype:  # pragma: no cover - ADD keeps src[0]'s dtype
            raise _fail(node, "the ADD's result must keep its operands' dtype")
        out_index = next((k for k, o in enumerate(sub.outputs) if o is pre_add and k > 0), None)
        prologue = Prologue(ib, out_index)
        xs = a
    if not ops or ops[0].op not in NORM_OPS:
        raise _fail(node, "the decomposition must start with RMS_NORM or NORM (or ADD then RMS_NORM/NORM)")
    norm = ops[0]
    if prologue is None:
        xs = norm.src[0]
        if xs is None or not xs.is_leaf or "fused_input" not in xs.params:
            raise _fail(node, f"{norm.op} must read a fused input directly, not {xs!r}")
    walked, running = walk_epilogue(ops[1:], norm, lambda msg: _fail(node, msg))
    steps = [EpilogueStep(op, fused_input_index(other)) for op, other in walked]
    if sub.outputs[0] is not running:
        raise _fail(node, "the decomposition's output is not the end of the norm chain")
    extra = [o for o in sub.outputs[1:] if o is not pre_add]
    if extra:
        raise _fail(node, f"extra output(s) {', '.join(repr(o.name) for o in extra)}: only the sum of the ADD before "
                    "the norm can be an extra output")
    return NormPlan(norm.op, int(xs.params["fused_input"]), float(norm.params.get("eps", 0.0)), tuple(steps),
                    prologue)


def _sum_output(node: Tensor, p: NormPlan) -> Tensor | None:
    """The decomposition tensor of the prologue's sum when it is an output of ``node`` (else None)."""
    if p.prologue is None or p.prologue.output is None:
        return None
    assert node.decomposition is not None
    return node.decomposition.outputs[p.prologue.output]


def _vec_ok(t: Tensor, v: int) -> bool:
    """Rows of ``t`` can be read as aligned ``v``-vectors (elements adjacent, row starts % v == 0)."""
    nb = elem_strides(t)
    return (t.ne[0] % v == 0 and nb[0] == 1 and elem_offset(t) % v == 0
            and all(nb[i] % v == 0 for i in (1, 2, 3) if t.ne[i] > 1))


def _pow2ceil(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


VEC_BYTES = 16  # widest load one thread issues (LDG.128; float4 / 8 halves)
VECS_PER_THREAD = 4  # vectors each thread keeps in flight (64 bytes of x per thread with 16-byte vectors)
MAX_CACHED_BYTES = 128  # CUDA: per-thread budget (bytes of x in storage type) for the row kept resident


CUDA_OPTS = {
    "sms": CUDA_SMS,  # SMs the persistent grid is sized for (H200); the kernel is correct for any grid
    "persist": False,  # persistent grid-stride blocks for many rows (see tune). Off: H200 sweep (2026-11-21,
    # bench/results/2026-11-21-h200-cuda.json) -- never faster than one block per row at rows >= 8192
    # (rms_norm_mul f32 8192x4096: 85.2 % vs 89.9 %; mul_add f16 8192x4096: 85.4 % vs 89.1 %)
    "persist_rows_per_block": 8,  # ... when every persistent block gets at least this many rows
    "persist_threads_per_sm": 512,  # resident threads per SM of the persistent grid (blocks = this / tpr)
    "persist_bytes": 64,  # bytes of x per thread per row in registers (double-buffered with pn)
    "persist_pn": True,  # next row loaded before this row's reduction
    "streaming": False,  # ld.global.cs / st.global.cs for x, per-row operands, dst
    "small_fill_threads": 1024,  # few rows: more threads per row while rows * tpr * 2 <= sms * this
    "small_tpr_max": 512,  # ... up to this many threads per row
    "dense": True,  # row offsets without index division where the layout allows (see _layout)
}
"""CUDA code-generation choices of :func:`tune` (benchmarks compare variants by overriding them:
``tune(..., opts={...})``)."""


def tune(node: Tensor, p: NormPlan, backend: str, vpt: int = VECS_PER_THREAD, *,
         opts: dict | None = None) -> Tuning:
    """Launch shape from the row length, dtypes and alignment.

    Vector width: 16-byte vectors when every bound tensor allows them (:func:`_vec_ok`): 8 halves
    when all are f16 (CUDA; MSL/WGSL stop at 4), else 4 elements; else 1. Threads per row: a power
    of two, 32..``PREF_TPR``, so that each thread holds about ``vpt`` vectors (enough bytes in flight
    per thread to cover DRAM latency without a long serial loop) or more for long rows, up to the
    register budget; past that up to ``MAX_TPR`` threads. Rows per workgroup: several when
    one row needs a single warp (short rows). Register slots: the row of x stays in registers when
    it fits the per-thread budget (``MAX_CACHED_BYTES`` on CUDA, ``MAX_CACHED_FLOATS`` elsewhere):
    x is read once and the operands' loads are issued together with x's, before the reduction.
    Longer rows are streamed (one pass over memory per reduction plus one for the output).

    CUDA, from the number of rows (:data:`CUDA_OPTS`, overridden by ``opts``): when few rows do not
    fill the GPU (``rows * tpr * 2 <= sms * small_fill_threads``) the threads per row double (up to
    ``small_tpr_max``; fewer serial loads per thread, more warps hiding the one DRAM round trip).
    When every block of a persistent grid (``persist_threads_per_sm / tpr`` blocks per SM) would
    get ``persist_rows_per_block`` rows or more (no prologue, resident row), the kernel is
    persistent: ``persist_bytes`` of x per thread per row (double-buffered when ``persist_pn``:
    the next row's loads are in flight during this row's reduction and stores; one block start
    per ``rows / grid`` rows instead of one per row)."""
    tensors = [node.src[i] for i in p.inputs] + [node]
    if (so := _sum_output(node, p)) is not None:
        tensors.append(so)
    vec = 1
    if backend in ("cuda", "wgsl") and all(t.dtype.size == 2 for t in tensors) and all(_vec_ok(t, 8) for t in tensors):
        vec = 8  # WGSL: vec4<u32> words of two halves (16-byte loads; see WGSL_OPTS)
    elif all(_vec_ok(t, 4) for t in tensors):
        vec = 4
    if backend == "wgsl" and vec == 8 and not WGSL_OPTS["f16x8"]:
        vec = 4
    nvec = -(-node.src[p.x].ne[0] // vec)
    esize = node.src[p.x].dtype.size

    def fits(k: int) -> bool:
        return k * vec * esize <= MAX_CACHED_BYTES if backend == "cuda" else k * vec <= MAX_CACHED_FLOATS

    tpr = min(max(_pow2ceil(-(-nvec // vpt)), SIMD), PREF_TPR[backend])
    slots = _pow2ceil(-(-nvec // tpr))
    while not fits(slots) and tpr < MAX_TPR[backend]:  # long row: more threads before streaming it
        tpr *= 2
        slots = _pow2ceil(-(-nvec // tpr))
    if not fits(slots):
        slots = 0
    rows = max(1, MIN_WG[backend] // tpr) if tpr == SIMD else 1
    if backend != "cuda":
        return Tuning(vec, tpr, rows, slots)
    o = {**CUDA_OPTS, **(opts or {})}
    x = node.src[p.x]
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    if rows == 1 and slots:
        # few rows (the GPU not filled): more threads per row, fewer serial slots per thread
        while (tpr < o["small_tpr_max"] and slots > 1 and nrows * tpr * 2 <= o["sms"] * o["small_fill_threads"]):
            tpr *= 2
            slots = _pow2ceil(-(-nvec // tpr))
    cs = bool(o["streaming"])
    if o["persist"] and rows == 1 and slots and p.prologue is None:
        ps = max(1, o["persist_bytes"] // (vec * esize))  # slots per thread in the persistent kernel
        ptpr = min(max(_pow2ceil(-(-nvec // ps)), SIMD), MAX_TPR[backend])
        pslots = _pow2ceil(-(-nvec // ptpr))
        per_sm = max(1, o["persist_threads_per_sm"] // ptpr)
        if fits(pslots) and nrows >= o["persist_rows_per_block"] * per_sm * o["sms"]:
            return Tuning(vec, ptpr, 1, pslots, per_sm, bool(o["persist_pn"]), cs)
    return Tuning(vec, tpr, rows, slots, cs=cs)


def _entry(p: NormPlan, bindings: list[Binding], tu: Tuning) -> str:
    dts = sorted({str(b.dtype) for b in bindings})
    name = f"{p.name}{'_sum' if p.prologue and p.prologue.output else ''}_{'_'.join(dts)}_v{tu.vec}_t{tu.tpr}"
    if tu.rows > 1:
        name += f"_r{tu.rows}"
    name += f"_k{tu.slots}" if tu.slots else "_stream"
    if tu.persist:
        name += f"_p{tu.persist}" + ("n" if tu.pn else "")
    if tu.seq:
        name += f"_s{tu.seq}" + ("n" if tu.pn else "")
    return name + ("_cs" if tu.cs else "")


def _grid(nwg: int, balanced: bool = False) -> tuple[int, int, int]:
    """2-D grid of at least ``nwg`` workgroups, x at most ``MAX_GRID``. ``balanced`` (WGSL): x is
    ``ceil(nwg / ceil(nwg / MAX_GRID))``, so that fewer than y workgroups are idle (65536 rows in
    one-row workgroups: 2 x 32768 rather than 2 x 65535, half of them running empty)."""
    if balanced:
        gx = -(-nwg // -(-nwg // MAX_GRID))
    else:
        gx = min(nwg, MAX_GRID)
    return (gx, -(-nwg // gx), 1)


WGSL_OPTS = {
    "f16x8": True,  # all-f16 rows as vec4<u32> (8 halves, 16-byte loads) instead of vec4<f16>
    "reduce": "tree",  # row sum: "tree" (log2(TPR) barriers), "two" (two-level), "subgroup" (needs the feature)
    "prefetch_floats": 0,  # operands loaded together with x when K * V * (1 + operands) <= this (0: never)
    "balanced_grid": True,
}
"""WGSL code-generation choices (benchmarks compare variants by changing them)."""


def _wgsl_context(p: NormPlan, tu: Tuning, prefetch: bool) -> dict:
    """WGSL-only template variables: ``RED`` (row-sum method), ``PF`` (operands of a resident row
    loaded with x, when their registers fit ``WGSL_OPTS["prefetch_floats"]``)."""
    nops = len({s.operand for s in p.steps})
    pf = (prefetch and tu.slots > 0 and nops > 0
          and tu.slots * tu.vec * (1 + nops) <= WGSL_OPTS["prefetch_floats"])
    return {"RED": WGSL_OPTS["reduce"], "PF": pf}


@family("norm_epilogue", ops=NORM_OPS)
def emit_norm_epilogue(node: Tensor, backend: str) -> Kernel:
    """Kernel for RMS_NORM / NORM (ggml_rms_norm / ggml_norm over ``ne[0]``) followed by the node's
    epilogue chain (:func:`plan`), for ``backend`` ``wgsl`` | ``cuda`` | ``msl``.

    Tensors: ``x = src[plan.x]`` f32/f16 ``ne = [n, ne1, ne2, ne3]`` with any row strides (elements of
    a row at stride ``nb0``); each operand f32/f16 with ``ne`` dividing x's (ggml_can_repeat,
    element ``i`` reads ``i % ne`` on every axis); result ``dst`` of the node's dtype and shape.
    RMS_NORM: ``x / sqrt(mean(x^2) + eps)``; NORM: ``(x - mean) / sqrt(var + eps)`` (population
    variance); all arithmetic in f32 registers. Bindings ``src<i>`` (the used sources, ascending)
    then ``dst``; params ``src<i>_ne0..3/_nb0..3/_offs``, ``dst_nb0..3/_offs`` (elements), ``eps``
    (f32) and ``grid_x`` (u32, workgroups along x; rows are folded into a 2-D grid).

    With an ADD prologue (patterns ``add_rms_norm*``, :class:`Prologue`): the norm reads
    ``x + src[prologue.operand]`` (ggml_add: the operand f32/f16 of x's dtype, ``ne`` dividing x's,
    read as ``i % ne``), computed in f32 and rounded to x's dtype as ggml stores the sum; when the sum
    is the FUSED node's extra output ``k`` (multi-output fusion) it is written to binding ``out<k>``
    (after ``dst``; the decomposition's output ``k``, i.e. the node's FUSED_OUTPUT ``k``; contiguous,
    x's dtype and ``ne``) with params ``out<k>_nb0..3/_offs``.
    Raises :class:`CodegenError` for a node :func:`plan` rejects.
    """
    return build(node, backend)


def _dense_rows(t: Tensor) -> bool:
    """Row ``r`` of ``t`` starts at ``offs + r * nb1`` (rows evenly spaced across dims 1..3)."""
    nb = elem_strides(t)
    return ((t.ne[2] == 1 or nb[2] == t.ne[1] * nb[1])
            and (t.ne[3] == 1 or nb[3] == t.ne[1] * t.ne[2] * nb[1]))


def _layout(node: Tensor, p: NormPlan) -> dict:
    """Layout classes the CUDA template specializes on (template variables ``DENSE``, ``INV``,
    ``FULL``): bindings whose row offset is ``offs + row * nb1`` (x, dst, the sum output and
    operands with x's rows), operands that are a single row broadcast to all rows, operands spanning
    the whole row (no ``i % ne0``)."""
    x = node.src[p.x]
    dense, inv, full = [], [], []
    if _dense_rows(x):
        dense.append(f"src{p.x}")
    if _dense_rows(node):
        dense.append("dst")
    so = _sum_output(node, p)
    if so is not None and _dense_rows(so):
        dense.append(f"out{p.prologue.output}")
    ops = {s.operand for s in p.steps} | ({p.prologue.operand} if p.prologue else set())
    for i in sorted(ops - {p.x}):
        t = node.src[i]
        if tuple(t.ne[1:]) == (1, 1, 1):
            inv.append(f"src{i}")
        elif tuple(t.ne[1:]) == tuple(x.ne[1:]) and _dense_rows(t):
            dense.append(f"src{i}")
        if t.ne[0] == x.ne[0]:
            full.append(f"src{i}")
    return {"DENSE": dense, "INV": inv, "FULL": full}


def persistent_grid(nrows: int, per_sm: int, sms: int | None = None) -> int:
    """Blocks of a persistent grid: about ``per_sm * sms`` blocks, as many as needed for an even
    share of rows (``ceil(rows / ceil(rows / target))``: every block gets the same number of rows
    but the last ones, at most one fewer)."""
    target = max(1, per_sm * (sms or CUDA_OPTS["sms"]))
    rpb = -(-nrows // target)
    return max(1, min(-(-nrows // rpb), MAX_GRID))


def build(node: Tensor, backend: str, tuning: Tuning | None = None, *, prefetch: bool = True,
          params_by_pointer: bool = False, dense: bool | None = None) -> Kernel:
    """:func:`emit_norm_epilogue` with its choices open (for benchmarks comparing variants):
    ``tuning`` replaces :func:`tune`'s; ``prefetch=False`` loads the operands after the reduction
    instead of together with x; ``params_by_pointer=True`` (CUDA) reads the parameter struct
    through a pointer to device memory (the calling convention before params went by value; launch
    it with :func:`fusec.backends.cuda_runtime.params_array`); ``dense=False`` (CUDA) leaves out
    the layout specializations (:func:`_layout`: index division for every row offset, as before).
    A persistent ``tuning`` (CUDA) runs :func:`persistent_grid` blocks."""
    p = plan(node)
    tu = tuning or tune(node, p, backend)
    if tu.persist and (backend != "cuda" or not tu.slots or p.prologue is not None or tu.rows != 1):
        raise CodegenError(f"node {node.name!r}: a persistent norm_epilogue kernel needs CUDA, a resident row "
                           f"(slots > 0), no prologue and one row per block (got {tu})")
    if tu.cs and backend != "cuda":
        raise CodegenError(f"node {node.name!r}: cache-streaming loads are CUDA only (got {tu})")
    if tu.seq and (backend != "wgsl" or not tu.slots or p.prologue is not None or tu.rows != 1):
        raise CodegenError(f"node {node.name!r}: rows one after another (seq) need WGSL, a resident row, no "
                           f"prologue and one row per workgroup (got {tu})")
    if tu.pn and not (tu.persist or tu.seq):
        raise CodegenError(f"node {node.name!r}: next-row prefetch needs a persistent (CUDA) or seq (WGSL) "
                           f"tuning (got {tu})")
    if tu.persist:
        prefetch = True  # the persistent body keeps every operand in registers
    x = node.src[p.x]
    bindings = [Binding(f"src{i}", node.src[i], node.src[i].dtype) for i in p.inputs]
    bindings.append(Binding("dst", node, node.dtype, write=True))
    so = _sum_output(node, p)
    if so is not None:  # multi-output: the prologue's sum (its FUSED_OUTPUT's memory, see plan.binding_root)
        bindings.append(Binding(f"out{p.prologue.output}", so, so.dtype, write=True))
    nrows = x.ne[1] * x.ne[2] * x.ne[3]
    wgsl = backend == "wgsl"
    if tu.persist:
        grid = (persistent_grid(nrows, tu.persist), 1, 1)
    elif tu.seq:
        grid = _grid(-(-nrows // tu.seq), balanced=WGSL_OPTS["balanced_grid"])
    else:
        grid = _grid(-(-nrows // tu.rows), balanced=wgsl and WGSL_OPTS["balanced_grid"])
    cuda_ctx = {}
    if backend == "cuda":
        use_dense = CUDA_OPTS["dense"] if dense is None else dense
        cuda_ctx = {**(_layout(node, p) if use_dense else {}), "CS": tu.cs, "PERSIST": tu.persist, "PN": tu.pn}
    params = []
    for i in p.inputs:
        params += layout_params(f"src{i}", node.src[i])
    params += layout_params("dst", node, ne=False)
    if so is not None:
        params += layout_params(f"out{p.prologue.output}", so, ne=False)
    params += [("eps", "f32", p.eps), ("grid_x", "u32", grid[0])]
    entry = _entry(p, bindings, tu)
    pre_operand = {p.prologue.operand} if p.prologue else set()
    names = [node.name]
    if node.decomposition is not None:
        names += [f"{t.name} ({t.op})" for t in node.decomposition.ops]
    types = TYPE_NAMES[backend]
    source = render(
        TEMPLATES[backend], entry=entry, family="norm_epilogue", what=p.describe(), nodes=names,
        norm=p.norm, x=f"src{p.x}", steps=[{"sym": s.symbol, "src": f"src{s.operand}"} for s in p.steps],
        operands=[f"src{i}" for i in sorted({s.operand for s in p.steps})],
        bases=[f"src{i}" for i in sorted({s.operand for s in p.steps} | pre_operand)],
        PRE=(None if p.prologue is None else
             {"b": f"src{p.prologue.operand}", "out": None if so is None else f"out{p.prologue.output}"}),
        bindings=bindings, types={b.name: types[b.dtype] for b in bindings}, params=params,
        V=tu.vec, TPR=tu.tpr, R=tu.rows, K=tu.slots, SIMD=SIMD, PREFETCH=prefetch, PBP=params_by_pointer,
        **(_wgsl_context(p, tu, prefetch and not tu.seq) if wgsl else {}), **cuda_ctx,
        SEQ=tu.seq, SPN=tu.pn and bool(tu.seq),
    )
    return Kernel(backend, "norm_epilogue", entry, source, bindings, params, (tu.workgroup, 1, 1), grid, node,
                  meta={"plan": p, "tuning": tu, "params_by_pointer": params_by_pointer})


__all__ = ["CUDA_OPTS", "EpilogueStep", "NormPlan", "Prologue", "Tuning", "build", "emit_norm_epilogue",
           "persistent_grid", "plan", "tune"]
