#!/usr/bin/env python3
"""Makes tests/fixtures/hf/: tiny Hugging Face models and tokenizers built by transformers and
tokenizers themselves, with the outputs Switchyard's tests must reproduce.

  bash scripts/bench_env.sh && .venv-bench/bin/python tools/make_hf_fixtures.py

(scripts/bench_env.sh installs the pinned torch / transformers / tokenizers into the git-ignored
.venv-bench/; CI never runs this: it reads the committed outputs.)

tokenizers/<family>/: tokenizer.json trained with `tokenizers` on a slice of data/austen.txt.gz
plus the multilingual lines below, and cases.json: test texts (as hex bytes, so invalid UTF-8
survives) with the ids `tokenizers` gives (`encode(text, add_special_tokens=True)`, invalid
UTF-8 decoded first with errors="replace") and the text `decode(ids)` gives back.

models/<arch>/: save_pretrained of a random model at tiny size with the options that reach every
code path (GQA, biases, q/k norms, sliding windows, rope scalings, shared experts, dense first
layers, MLA), its tokenizer, and expected.json + logits.safetensors: the prompt ids, the float32
eager-attention logits of every position, the largest gap between those and a float64 run of the
same model (the rounding noise of float32 itself, from which the tests' tolerance is set), and
32 greedy tokens, generated with a seed chosen so that no step is a near-tie.
"""
import gzip
import json
import math
import os
import shutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "tokenizers": "0.23.3"}

import torch  # noqa: E402
import transformers  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402

for mod in (torch, transformers, tokenizers):
    want = PINNED[mod.__name__]
    if not mod.__version__.startswith(want):
        sys.exit(f"make_hf_fixtures: {mod.__name__} {mod.__version__}, expected {want} "
                 "(run scripts/bench_env.sh)")

# Short lines in many scripts (our own words), so the tokenizers meet more than Latin.
MULTILINGUAL = [
    "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι.",
    "Все люди рождаются свободными и равными.",
    "人人生而自由，在尊严和权利上一律平等。",
    "すべての人間は、生まれながらにして自由である。",
    "모든 인간은 태어날 때부터 자유롭다.",
    "يولد جميع الناس أحراراً متساوين في الكرامة.",
    "כל בני האדם נולדו בני חורין ושווים.",
    "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता प्राप्त है।",
    "มนุษย์ทั้งหลายเกิดมามีอิสระและเสมอภาคกัน",
    "Tous les êtres humains naissent libres et égaux en dignité.",
    "Alle Menschen sind frei und gleich an Würde geboren. Straße, Größe.",
    "Numbers 1234567 and 3.14159, tabs\tand  double  spaces.",
]
TEST_TEXTS = [
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\r\n\n\tindented",
    "It's what they'd've done; we'll see. I'M SURE.",
    "1234567890 12 3.5 ٣٤٥",
    "emoji: 😀🎉👩‍👩‍👧 ❤️ 🇫🇷",
    "Café naïve coöperate ﬁ ① Ⅻ",  # precomposed and compatibility characters
    "Cafe\u0301 (combining accent)",
    "",
    " ",
    "\u00a0non-breaking\u2003em space",
] + MULTILINGUAL
INVALID_UTF8 = [
    b"bad \xff byte",
    b"lone \x80 continuation",
    b"truncated \xe2\x82",
    b"overlong \xc0\xaf slash",
    b"surrogate \xed\xa0\x80 half",
    b"\xf4\x90\x80\x80 above U+10FFFF",
    b"ends mid sequence \xf0\x9f\x98",
]

QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3's split, cut to its Latin/Greek/Cyrillic letter ranges.
DEEPSEEK_PAT = (r"[\r\n]|\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯ]+"
                r"|\s?[!-/:-~！-／：-～‘-‟　-。]+|\s+$|[^\r\n\p{L}\p{P}\p{S}]+")


def corpus():
    with gzip.open(os.path.join(ROOT, "data", "austen.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read(120_000)
    return [line for line in text.split("\n") if line.strip()] + MULTILINGUAL * 3


def train_byte_level(family):
    """Byte-level BPE, as Qwen2/3 (Split regex + NFC), OLMoE (GPT-2's regex inside ByteLevel)
    and DeepSeek-V3 (a sequence of splits) ship them."""
    tok = Tokenizer(models.BPE())
    specials = {"qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "gpt2": ["<|endoftext|>", "<|padding|>"],
                "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]}[family]
    if family == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif family == "gpt2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(DEEPSEEK_PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if family == "deepseek":
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok, specials


def train_sentencepiece_style():
    """BPE over '▁'-marked text with byte fallback, as Llama and Mixtral ship it: Prepend and
    Replace normalizers, no pre-tokenizer, <0xNN> byte tokens for characters outside the
    vocabulary, a BOS template, and the Replace/ByteFallback/Fuse/Strip decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, limit_alphabet=90,
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())
    trained = spec["model"]["vocab"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return tok, specials


def tokenizer_cases(tok, specials):
    texts = [t.encode("utf-8") for t in TEST_TEXTS] + INVALID_UTF8
    texts.append(f"{specials[1]}special in the middle{specials[-1]} and{specials[0]}".encode())
    cases = []
    for raw in texts:
        text = raw.decode("utf-8", errors="replace")
        ids = tok.encode(text, add_special_tokens=True).ids
        cases.append({"hex": raw.hex(), "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    return cases


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def make_tokenizers():
    toks = {}
    for family in ("sp", "qwen", "gpt2", "deepseek"):
        tok, specials = train_sentencepiece_style() if family == "sp" else train_byte_level(family)
        d = os.path.join(OUT, "tokenizers", family)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        write_json(os.path.join(d, "cases.json"), tokenizer_cases(tok, specials))
        toks[family] = (tok, specials)
        print(f"tokenizer {family}: {tok.get_vocab_size()} tokens")
    return toks


def common(vocab, **kw):
    base = dict(vocab_size=vocab, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.08, rms_norm_eps=1e-6)
    base.update(kw)
    return base


def arch_specs():
    # (model_type, tokenizer family, config, weight dtype)
    return {
        "llama": ("llama", "sp", dict(
            num_hidden_layers=2, intermediate_size=96, attention_bias=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}), torch.float32),
        "qwen2": ("qwen2", "qwen", dict(
            num_hidden_layers=2, intermediate_size=96, use_sliding_window=True, sliding_window=6,
            max_window_layers=1,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
            torch.float32),
        "qwen3": ("qwen3", "qwen", dict(
            num_hidden_layers=2, intermediate_size=96, head_dim=24, tie_word_embeddings=True),
            torch.float32),
        "mixtral": ("mixtral", "sp", dict(
            num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            torch.float32),
        "qwen2_moe": ("qwen2_moe", "qwen", dict(
            num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True, qkv_bias=True,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            use_sliding_window=True, sliding_window=7), torch.float32),
        "qwen3_moe": ("qwen3_moe", "qwen", dict(
            num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, head_dim=16,
            num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
            norm_topk_prob=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64}), torch.bfloat16),
        "olmoe": ("olmoe", "gpt2", dict(
            num_hidden_layers=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=False, clip_qkv=3.0, pad_token_id=1, eos_token_id=0), torch.float32),
        "deepseek_v3": ("deepseek_v3", "deepseek", dict(
            num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
            topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=16,
            routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
            bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
            torch.float32),
    }


PROMPT = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
          "disposition. Все люди 人人生而自由 😀")


def make_model(name, model_type, family, kw, dtype, toks):
    tok, specials = toks[family]
    vocab = tok.get_vocab_size()
    d = os.path.join(OUT, "models", name)
    shutil.rmtree(d, ignore_errors=True)
    ids = tok.encode(PROMPT, add_special_tokens=True).ids
    for seed in range(1, 50):
        torch.manual_seed(seed)
        cfg = transformers.AutoConfig.for_model(model_type, **common(vocab, **kw))
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        # The reference is what transformers computes from the saved directory, loaded in float32
        # (bf16 weights upcast, as Switchyard computes) with eager attention and experts.
        load = dict(attn_implementation="eager", experts_implementation="eager")
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **load).eval()
        exact = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, **load).eval()
        with torch.no_grad():
            x = torch.tensor([ids])
            logits = ref(x).logits[0]
            gap = float((logits.double() - exact(x).logits[0]).abs().max())
            # Greedy decoding through transformers' KV cache, one token per step (generate()
            # is not used: for deepseek_v3 it picks other tokens than its own forward's argmax).
            cache = transformers.DynamicCache(config=ref.config)
            out = ref(x, past_key_values=cache, use_cache=True)
            greedy, margin = [], math.inf
            for _ in range(32):
                top = out.logits[0, -1].topk(2)
                margin = min(margin, float(top.values[0] - top.values[1]))
                greedy.append(int(top.indices[0]))
                out = ref(torch.tensor([[greedy[-1]]]), past_key_values=cache, use_cache=True)
        if margin > 2e-3:
            break
    else:
        sys.exit(f"{name}: no seed without a near-tie in greedy decoding")
    tok.save(os.path.join(d, "tokenizer.json"))
    write_json(os.path.join(d, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0] if family != "sp" else "<s>",
                "eos_token": specials[-1] if family != "sp" else "</s>"})
    save_file({"logits": logits.contiguous()}, os.path.join(d, "logits.safetensors"))
    write_json(os.path.join(d, "expected.json"), {
        "prompt": PROMPT, "input_ids": ids, "greedy": greedy,
        "greedy_min_margin": margin, "f32_vs_f64_max_abs": gap, "seed": seed,
        "weights_dtype": str(dtype).replace("torch.", ""),
        "logits_max_abs": float(logits.abs().max()),
        "versions": {k: v.__version__ for k, v in
                     (("torch", torch), ("transformers", transformers), ("tokenizers", tokenizers))}})
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"model {name}: seed {seed}, {len(ids)} prompt tokens, margin {margin:.4f}, "
          f"f32 gap {gap:.2e}, {size / 1024:.0f} KiB")


def main():
    torch.set_num_threads(2)
    toks = make_tokenizers()
    only = sys.argv[1:]
    for name, (model_type, family, kw, dtype) in arch_specs().items():
        if not only or name in only:
            make_model(name, model_type, family, kw, dtype, toks)


if __name__ == "__main__":
    main()
