"""fusec: an op-fusion compiler for ML inference graphs (ggml vocabulary).

Pipeline: patterns (``patterns/*.fuse``, Lark DSL) -> matcher/rewriter over the IR graph ->
Jinja2 kernel templates (WGSL, CUDA, MSL) -> backends (numpy reference, wgpu, cuda, metal-emit).
"""

__version__ = "0.1.0"
