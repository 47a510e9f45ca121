"""fusec vs transformers on tiny random Llama, Qwen2 and Mistral checkpoints, from HF and GGUF files, and on
Gemma-2, Qwen3 and Qwen3-MoE checkpoints from HF files (their GGUF conversions: same weights and config).

Each model is built with transformers from its real config class (2 layers, hidden 64, 4 heads,
2 KV heads, FFN 128, vocab 288), given O(1)-scale random weights, saved with ``save_pretrained``
(safetensors) and converted to a llama.cpp GGUF by :func:`write_gguf` below -- written here from
llama.cpp's conventions (tensor names, metadata keys, the q/k row permutation of
``convert_hf_to_gguf.py``), independently of fusec's loader.

Error measure: for each decode step (step 0 = the prompt, all its rows; steps 1..8 = one greedy
token each) ``rel = max|fusec - hf| / max|hf|`` over the step's logits; f32 files must stay within
``REL_TOL_F32 = 1e-4`` on every step. Measured (numpy and lavapipe, fusion on and off, both files):
llama 6.8e-7, qwen2 8.8e-7, mistral 5.3e-7.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

from fusec.backends import get_backend, wgpu_runtime  # noqa: E402
from fusec.cli import main  # noqa: E402
from fusec.dsl import default_patterns  # noqa: E402
from fusec.models import load_model  # noqa: E402
from fusec.runtime import DecodeSession  # noqa: E402
from tests.gguf_util import llama_gguf_writer  # noqa: E402

REL_TOL_F32 = 1e-4
# Q8_0 keeps ~8 bits per weight (one f16 scale per 32), Q4_0 ~4 bits: the logits move by quantization
# noise, and Gaussian random weights are a worst case for 4-bit blocks. Measured maxima (llama, teacher-forced
# on transformers' tokens): Q8_0 2.3e-2, Q4_0 0.51 (mistral: 1.9e-2, 0.35). The loader itself is checked
# exactly (dequantized values equal gguf.quants'), and the f32 path to 1e-4 above.
REL_TOL_Q8_0 = 5e-2
REL_TOL_Q4_0 = 1.0
N_DECODE = 8
PROMPT = [1, 17, 200, 5, 99, 42]
VOCAB = 288
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)
ARCHS = {
    # name: (config class, model class, extra config, llama.cpp architecture, permute q/k for rope mode 0)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False), "llama", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qwen2", False),
    # sliding_window 4 < prompt + decode length: the SWA mask matters on most steps
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=4), "llama",
                True),
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- building the checkpoints --------------------------------------------------------------------------


def make_hf_model(arch: str, seed: int = 0):
    cfg_cls, model_cls, extra, _, _ = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**SIZES, **extra, rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"  # the eager path applies the sliding-window mask explicitly
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) activations: N(0, 1/fan_in) matrices, norms 1 + 0.1 N, biases 0.1 N
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation, by explicit row indices: within each head of size
    ``hd``, GGUF row ``2i`` is HF row ``i`` and GGUF row ``2i+1`` is HF row ``i + hd/2``."""
    hd = w.shape[0] // n_head
    order = [h * hd + i + j * (hd // 2) for h in range(n_head) for i in range(hd // 2) for j in (0, 1)]
    return w[order]


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors by llama.cpp GGUF name (numpy order, f32), q/k permuted where llama.cpp does."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    permute = ARCHS[arch][4]
    for il in range(cfg.num_hidden_layers):
        h, p = f"model.layers.{il}.", f"blk.{il}."
        q, k = sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"]
        if permute:
            q = _llama_cpp_permute(q, cfg.num_attention_heads)
            k = _llama_cpp_permute(k, cfg.num_key_value_heads)
        out.update({
            p + "attn_norm.weight": sd[h + "input_layernorm.weight"],
            p + "attn_q.weight": q, p + "attn_k.weight": k, p + "attn_v.weight": sd[h + "self_attn.v_proj.weight"],
            p + "attn_output.weight": sd[h + "self_attn.o_proj.weight"],
            p + "ffn_norm.weight": sd[h + "post_attention_layernorm.weight"],
            p + "ffn_gate.weight": sd[h + "mlp.gate_proj.weight"], p + "ffn_up.weight": sd[h + "mlp.up_proj.weight"],
            p + "ffn_down.weight": sd[h + "mlp.down_proj.weight"],
        })
        if arch == "qwen2":
            for t in "qkv":
                out[p + f"attn_{t}.bias"] = sd[h + f"self_attn.{t}_proj.bias"]
    return out


def write_gguf(path, model, arch: str, qtype=None, tensors=None, vocab=None, gguf_arch=None):
    """Write a llama.cpp GGUF: metadata keys of ``convert_hf_to_gguf.py`` and tensors (matrices
    quantized to ``qtype`` with ``gguf.quants.quantize`` when given). ``vocab``: (tokens, merges)."""
    cfg = model.config
    ga = gguf_arch or ARCHS[arch][3]
    w = llama_gguf_writer(path, ga, cfg, 5000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "mistral":
        w.add_sliding_window(cfg.sliding_window)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(vocab[0])
        w.add_token_merges(vocab[1])
        w.add_eos_token_id(2)
    for name, arr in (tensors if tensors is not None else gguf_tensors(model, arch)).items():
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{arch: (hf_model, hf_dir, gguf_path, hf_reference)}; reference = (tokens fed, logits per step)."""
    out = {}
    for arch in ARCHS:
        model = make_hf_model(arch)
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d / "hf", safe_serialization=True)
        write_gguf(d / "model.gguf", model, arch)
        out[arch] = (model, d / "hf", d / "model.gguf", hf_reference(model))
    return out


def hf_reference(model):
    """transformers greedy decoding: the tokens fed to the decode steps and each step's logits."""
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(N_DECODE):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        full = model(torch.tensor([seq])).logits[0].numpy()
    p = len(PROMPT)
    return seq, [full[:p]] + [full[p + i:p + i + 1] for i in range(N_DECODE)]


def run_steps(sess, seq):
    """fusec decoding of ``seq``: the prompt in one step, then one token per step."""
    p = len(PROMPT)
    return [sess.step(seq[:p])] + [sess.step([t]) for t in seq[p:]]


def check_steps(got, seq, ref, tol):
    errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errs) <= tol, f"max relative error per step {['%.1e' % e for e in errs]} > {tol}"
    # same greedy path: each step's argmax is the next token transformers chose
    assert [int(np.argmax(g[-1])) for g in got[:-1]] == seq[len(PROMPT):]
    return max(errs)


# -- equivalence -----------------------------------------------------------------------------------------


BACKENDS = ["numpy", pytest.param("wgpu", marks=pytest.mark.wgpu)]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(checkpoints, arch, backend, fuse):
    if backend == "wgpu" and not wgpu_runtime.available():
        pytest.skip("no wgpu adapter")
    _, hf_dir, gguf_path, (seq, ref) = checkpoints[arch]
    cfg_hf, w_hf, _ = load_model(hf_dir)
    cfg_gg, w_gg, _ = load_model(gguf_path)
    assert cfg_hf.num_hidden_layers == cfg_gg.num_hidden_layers == 2
    assert (cfg_hf.sliding_window, cfg_gg.sliding_window) == ((4, 4) if arch == "mistral" else (None, None))
    sess = DecodeSession(cfg_hf, get_backend(backend), w_hf, kv_size=32,
                         patterns=default_patterns() if fuse else None)
    check_steps(run_steps(sess, seq), seq, ref, REL_TOL_F32)
    if fuse:
        assert sess.last_report is not None and sess.last_report.total_matches > 0
    sess.backend.set_weights(w_gg)  # same graphs (same config), the GGUF file's weights
    sess.reset()
    check_steps(run_steps(sess, seq), seq, ref, REL_TOL_F32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_and_gguf_files_give_the_same_weights(checkpoints, arch):
    """The loader's q/k permutation of the HF file equals the converter's (written independently above)."""
    _, hf_dir, gguf_path, _ = checkpoints[arch]
    cfg_hf, w_hf, _ = load_model(hf_dir)
    cfg_gg, w_gg, _ = load_model(gguf_path)
    assert cfg_hf.rope_mode == cfg_gg.rope_mode == (2 if arch == "qwen2" else 0)
    assert cfg_hf.tie_word_embeddings == cfg_gg.tie_word_embeddings == (arch == "qwen2")
    assert w_hf.keys() == w_gg.keys()
    for name in w_hf:
        np.testing.assert_array_equal(w_hf[name], w_gg[name], err_msg=name)


def test_unpermuted_hf_weights_in_mode_0_differ(checkpoints):
    """The permutation is needed: loading q/k in HF order into the mode-0 graph changes the logits."""
    model, hf_dir, _, (seq, ref) = checkpoints["llama"]
    cfg, w, _ = load_model(hf_dir)
    raw = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for il in range(cfg.num_hidden_layers):
        for t in "qk":
            w[f"blk.{il}.attn_{t}.weight"] = raw[f"model.layers.{il}.self_attn.{t}_proj.weight"].reshape(
                w[f"blk.{il}.attn_{t}.weight"].shape)
    got = DecodeSession(cfg, "numpy", w, kv_size=32).step(seq[:len(PROMPT)])
    assert rel_err(got, ref[0]) > 1e-2


@pytest.mark.parametrize("qname,tol", [("Q8_0", REL_TOL_Q8_0), ("Q4_0", REL_TOL_Q4_0)])
def test_quantized_gguf_runs_close_to_transformers(checkpoints, tmp_path, qname, tol):
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    model, _, _, (seq, ref) = checkpoints["llama"]
    path = tmp_path / f"model-{qname}.gguf"
    tensors = gguf_tensors(model, "llama")
    write_gguf(path, model, "llama", qtype=qtype, tensors=tensors)
    cfg, w, _ = load_model(path)
    # dequantized exactly as gguf.quants does
    q = tensors["blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(w["blk.0.ffn_down.weight"].reshape(q.shape),
                                  gguf.quants.dequantize(gguf.quants.quantize(q, qtype), qtype))
    sess = DecodeSession(cfg, "numpy", w, kv_size=32, patterns=default_patterns())
    p = len(PROMPT)
    got = [sess.step(seq[:p])] + [sess.step([t]) for t in seq[p:]]  # teacher-forced on transformers' tokens
    errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert 0.0 < max(errs) <= tol, errs
    agree = [int(np.argmax(g[-1])) == int(np.argmax(r[-1])) for g, r in zip(got, ref, strict=True)]
    assert sum(agree) >= len(agree) - (0 if qname == "Q8_0" else 2), agree


# -- text prompts ----------------------------------------------------------------------------------------


CORPUS = ["hello world, hello fusec", "the quick brown fox jumps over the lazy dog",
          "fused kernels run fast; tokens stream out"] * 20


def train_tokenizer():
    """A byte-level BPE of VOCAB ids (256 byte symbols + merges + 3 specials) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    assert tk.get_vocab_size() <= VOCAB
    return tk


def test_prompt_streams_the_transformers_greedy_text(checkpoints, tmp_path, capsys):
    model, hf_dir, _, _ = checkpoints["llama"]
    tk = train_tokenizer()
    d = tmp_path / "ckpt"
    model.save_pretrained(d, safe_serialization=True)
    tk.save(str(d / "tokenizer.json"))
    text = "hello world"
    ids = tk.encode(text).ids
    with torch.no_grad():
        seq = list(ids)
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    expected = tk.decode(seq[len(ids):])
    assert main(["run", "--model", str(d), "--prompt", text, "--tokens", "5", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert text + expected in out
    assert "tokens/s" in out

    # the same vocabulary embedded in a GGUF (tokenizer.ggml.model = "gpt2") gives the same text
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    g = tmp_path / "with-vocab.gguf"
    write_gguf(g, model, "llama", vocab=(tokens, merges))
    _, _, gtk = load_model(g)
    assert gtk is not None and gtk.encode(text) == ids
    assert main(["run", "--model", str(g), "--prompt", text, "--tokens", "5", "--backend", "numpy"]) == 0
    assert text + expected in capsys.readouterr().out


def test_prompt_without_vocabulary_asks_for_ids(checkpoints, capsys):
    _, _, gguf_path, _ = checkpoints["qwen2"]
    assert main(["run", "--model", str(gguf_path), "--prompt", "hi", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompt-ids" in err
    assert main(["run", "--model", str(gguf_path), "--prompt-ids", "1,2,3", "--tokens", "2",
                 "--backend", "numpy"]) == 0


# -- Gemma-2, Qwen3, Qwen3-MoE (HF checkpoints; their GGUF conversions below) -------------------------------

# Gemma-2: head_dim 64 (not hidden/heads) so the softcap attention pattern applies; query_pre_attn_scalar
# 48 != head_dim so the Q scale is checked; sliding_window 4 < prompt + decode length on the even layers of
# 3; softcaps 5 and 3 are small enough to bend the logits. Qwen3: explicit head_dim 64 (!= 64/4; the flash
# kernels take D in {64, 80, 96, 128, 256}), q/k norms.
# Measured max relative error (numpy and lavapipe, fused and unfused, flash attention on and off):
# gemma2 1.3e-6, qwen3 1.1e-6, qwen3moe 1.2e-6.
HF_ONLY = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=3, head_dim=64, query_pre_attn_scalar=48, sliding_window=4,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=64, tie_word_embeddings=False)),
    # top-2 of 8 experts, renormalized; transformers >= 5 keeps the experts as 3-D parameters and saves them
    # per expert (mlp.experts.{e}.*_proj.weight), which the loader stacks as llama.cpp's converter does
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def hf_only_checkpoints(tmp_path_factory):
    """{arch: (hf_dir, (tokens fed, logits per step))} for Gemma-2, Qwen3 and Qwen3-MoE."""
    out = {}
    for arch, (cfg_cls, model_cls, extra) in HF_ONLY.items():
        cfg = getattr(transformers, cfg_cls)(**{**SIZES, **extra}, rope_theta=5000.0, bos_token_id=1,
                                             eos_token_id=2)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).float().eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # Gemma's norms compute x*(1 + w): N(0, 0.1) keeps them near 1 like the others
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_((0.0 if arch == "gemma2" else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
                elif p.ndim >= 2:  # matrices and 3-D expert stacks: fan_in is the last axis
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        d = tmp_path_factory.mktemp(arch) / "hf"
        model.save_pretrained(d, safe_serialization=True)
        out[arch] = (d, hf_reference(model))
    return out


@pytest.mark.parametrize("flash_attn", [False, True], ids=["mha", "flash"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(HF_ONLY))
def test_hf_only_logits_match_transformers(hf_only_checkpoints, arch, backend, fuse, flash_attn):
    if backend == "wgpu" and not wgpu_runtime.available():
        pytest.skip("no wgpu adapter")
    hf_dir, (seq, ref) = hf_only_checkpoints[arch]
    cfg, w, _ = load_model(hf_dir)
    assert cfg.arch == arch and cfg.rope_mode == 2 and cfg.qk_norm == arch.startswith("qwen3")
    assert cfg.iswa == (arch == "gemma2") and cfg.is_moe == (arch == "qwen3moe")
    sess = DecodeSession(cfg, get_backend(backend), w, kv_size=32, flash_attn=flash_attn,
                         patterns=default_patterns() if fuse else None)
    check_steps(run_steps(sess, seq), seq, ref, REL_TOL_F32)
    if fuse and arch == "gemma2" and not flash_attn:
        assert sess.last_report.patterns["attention_flash_softcap"].matches == 3
    if arch == "qwen3moe":
        np.testing.assert_array_equal(  # expert 5's up projection, stacked at index 5 (ne = [in, out, E])
            w["blk.1.ffn_up_exps.weight"].reshape(8, 32, 64)[5],
            hf_tensor(hf_dir, "model.layers.1.mlp.experts.5.up_proj.weight"))


def hf_tensor(d, name):
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))[name]


def write_gguf_hf_only(path, hf_dir, model, arch):
    """A llama.cpp GGUF of a Gemma-2 / Qwen3 / Qwen3-MoE checkpoint, from its safetensors file: names and metadata as
    ``convert_hf_to_gguf.py`` (Gemma2Model: every norm weight + 1; Qwen3MoeModel: experts stacked to
    [n_expert, out, in] numpy / ne [in, out, n_expert]), written here independently of fusec's loader."""
    from safetensors.numpy import load_file

    cfg = model.config
    sd = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    w = llama_gguf_writer(path, arch, cfg, 5000.0)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    one = np.float32(1.0) if arch == "gemma2" else np.float32(0.0)
    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + one}
    if not cfg.tie_word_embeddings:
        t["output.weight"] = sd["lm_head.weight"]
    for il in range(cfg.num_hidden_layers):
        h, p = f"model.layers.{il}.", f"blk.{il}."
        t.update({p + "attn_norm.weight": sd[h + "input_layernorm.weight"] + one,
                  p + "attn_q.weight": sd[h + "self_attn.q_proj.weight"],
                  p + "attn_k.weight": sd[h + "self_attn.k_proj.weight"],
                  p + "attn_v.weight": sd[h + "self_attn.v_proj.weight"],
                  p + "attn_output.weight": sd[h + "self_attn.o_proj.weight"]})
        if arch == "gemma2":
            t.update({p + "post_attention_norm.weight": sd[h + "post_attention_layernorm.weight"] + one,
                      p + "ffn_norm.weight": sd[h + "pre_feedforward_layernorm.weight"] + one,
                      p + "post_ffw_norm.weight": sd[h + "post_feedforward_layernorm.weight"] + one})
        else:
            t.update({p + "ffn_norm.weight": sd[h + "post_attention_layernorm.weight"],
                      p + "attn_q_norm.weight": sd[h + "self_attn.q_norm.weight"],
                      p + "attn_k_norm.weight": sd[h + "self_attn.k_norm.weight"]})
        if arch == "qwen3moe":
            t[p + "ffn_gate_inp.weight"] = sd[h + "mlp.gate.weight"]
            for kind in ("gate", "up", "down"):
                t[p + f"ffn_{kind}_exps.weight"] = np.stack(
                    [sd[h + f"mlp.experts.{e}.{kind}_proj.weight"] for e in range(cfg.num_experts)])
        else:
            for kind in ("gate", "up", "down"):
                t[p + f"ffn_{kind}.weight"] = sd[h + f"mlp.{kind}_proj.weight"]
    for name, arr in t.items():
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", list(HF_ONLY))
def test_hf_only_gguf_gives_the_hf_weights_and_logits(hf_only_checkpoints, tmp_path, arch):
    """The GGUF conversion loads to the same weights and config as the HF directory -- except Gemma-2's Q
    scale, which llama.cpp derives from the model size (1/sqrt(head_dim) below 27B), not from
    query_pre_attn_scalar (48 in this tiny model; equal to head_dim in the real 2B and 9B)."""
    import dataclasses

    hf_dir, (seq, ref) = hf_only_checkpoints[arch]
    model_cfg = json.loads((hf_dir / "config.json").read_text())
    path = tmp_path / f"{arch}.gguf"

    class _M:  # the writer reads the transformers config attributes
        config = getattr(transformers, HF_ONLY[arch][0]).from_dict(model_cfg)

    write_gguf_hf_only(path, hf_dir, _M, arch)
    cfg_hf, w_hf, _ = load_model(hf_dir)
    cfg_gg, w_gg, _ = load_model(path)
    assert w_hf.keys() == w_gg.keys()
    for name in w_hf:
        np.testing.assert_array_equal(w_hf[name], w_gg[name], err_msg=name)
    if arch == "gemma2":
        assert (cfg_hf.query_pre_attn_scalar, cfg_gg.query_pre_attn_scalar) == (48.0, 64.0)
        cfg_gg = dataclasses.replace(cfg_gg, query_pre_attn_scalar=48.0)
    assert cfg_gg.rms_norm_eps == pytest.approx(cfg_hf.rms_norm_eps, rel=1e-6)  # stored as f32 in the GGUF
    same = dict(name="x", max_position_embeddings=0, rms_norm_eps=0.0)
    assert dataclasses.replace(cfg_gg, **same) == dataclasses.replace(cfg_hf, **same)
    if arch != "gemma2":
        sess = DecodeSession(cfg_gg, "numpy", w_gg, kv_size=32, patterns=default_patterns())
        check_steps(run_steps(sess, seq), seq, ref, REL_TOL_F32)
