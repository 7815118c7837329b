// LmParams -> mixtral / llama tensors (projections transposed to [out, in]), config.json,
// generation_config.json and a byte-level tokenizer.json, each written atomically.
#include "switchyard/io/hf_export.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "switchyard/core/file.h"
#include "switchyard/io/safetensors.h"

namespace sy {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace {

// [rows, cols] f32 -> its transpose [cols, rows] (columns c0..c0+n of the source only).
Tensor transposed(const float* src, int64_t rows, int64_t stride, int64_t c0, int64_t n) {
  Tensor t({n, rows}, DType::kF32);
  float* d = t.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) d[c * rows + r] = src[r * stride + c0 + c];
  return t;
}
Tensor transposed(const Tensor& m) {
  return transposed(m.data<float>(), m.dim(0), m.dim(1), 0, m.dim(1));
}

}  // namespace

std::string byte_tokenizer_json() {
  // GPT-2's printable stand-ins for the 256 bytes, so that tokenizers' ByteLevel pieces map
  // back to them; no merges, so every byte is its own token.
  ordered_json vocab = ordered_json::object();
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + extra++);
    std::string s;
    if (cp < 0x80)
      s += char(cp);
    else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    vocab[s] = b;
  }
  ordered_json j = {{"version", "1.0"},
                    {"truncation", nullptr},
                    {"padding", nullptr},
                    {"added_tokens", ordered_json::array()},
                    {"normalizer", nullptr},
                    {"pre_tokenizer",
                     {{"type", "ByteLevel"},
                      {"add_prefix_space", false},
                      {"trim_offsets", false},
                      {"use_regex", false}}},
                    {"post_processor", nullptr},
                    {"decoder",
                     {{"type", "ByteLevel"},
                      {"add_prefix_space", false},
                      {"trim_offsets", false},
                      {"use_regex", false}}},
                    {"model",
                     {{"type", "BPE"},
                      {"dropout", nullptr},
                      {"unk_token", nullptr},
                      {"continuing_subword_prefix", nullptr},
                      {"end_of_word_suffix", nullptr},
                      {"fuse_unk", false},
                      {"byte_fallback", false},
                      {"ignore_merges", false},
                      {"vocab", vocab},
                      {"merges", ordered_json::array()}}}};
  return j.dump(1);
}

std::vector<std::string> export_hf_model(const LmConfig& cfg, const LmParams& p,
                                         const std::string& out_dir) {
  const MoeConfig& m = cfg.moe;
  const bool moe = cfg.moe_every > 0;
  auto refuse = [](const std::string& what) { throw ConfigError(fmt::format("export: {}", what)); };
  if (cfg.moe_every > 1)
    refuse(
        fmt::format("model.moe_every = {}: dense layers between MoE layers have no "
                    "transformers architecture without other differences (mixtral: every "
                    "layer MoE; llama: none)",
                    cfg.moe_every));
  if (moe) {
    if (m.gating != Gating::kSoftmaxTopK)
      refuse(
          "model.moe.router: only softmax_topk has a transformers equivalent (mixtral); "
          "expert choice, hash, random, noisy top-k and sigmoid-bias routing do not");
    if (!m.renormalize)
      refuse("model.moe.renormalize = false: mixtral always renormalises the top-k weights");
    if (m.n_groups > 0) refuse("model.moe.n_groups: group-limited routing is not in mixtral");
    if (m.n_shared_experts > 0) refuse("model.moe.n_shared_experts: mixtral has no shared experts");
  }
  if (p.embed.dtype() != DType::kF32) refuse("parameters: expected f32");
  std::vector<std::string> notes;
  if (moe && !m.dropless)
    notes.push_back(fmt::format(
        "mixtral computes every chosen expert (dropless); Switchyard's evaluation drops tokens "
        "past capacity_factor_eval = {}, so the exported logits equal Switchyard's dropless "
        "evaluation",
        m.capacity_factor_eval));
  if (cfg.precision != Precision::kF32)
    notes.push_back(
        fmt::format("weights are written in f32; model.precision = {} is a compute "
                    "choice transformers does not record",
                    precision_name(cfg.precision)));

  const int64_t d = cfg.d_model, V = cfg.vocab, H = cfg.n_heads;
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](std::string name, Tensor t) { out.emplace_back(std::move(name), std::move(t)); };
  add("model.embed_tokens.weight", p.embed.clone());
  add("model.norm.weight", p.norm_out.clone());
  add("lm_head.weight", transposed(p.lm_head));
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const LayerParams& lp = p.layers[l];
    const std::string at = fmt::format("model.layers.{}.", l);
    add(at + "input_layernorm.weight", lp.norm_attn.clone());
    add(at + "post_attention_layernorm.weight", lp.norm_ffn.clone());
    const float* qkv = lp.attn.w_qkv.data<float>();
    add(at + "self_attn.q_proj.weight", transposed(qkv, d, 3 * d, 0, d));
    add(at + "self_attn.k_proj.weight", transposed(qkv, d, 3 * d, d, d));
    add(at + "self_attn.v_proj.weight", transposed(qkv, d, 3 * d, 2 * d, d));
    add(at + "self_attn.o_proj.weight", transposed(lp.attn.w_o));
    if (!moe) {
      add(at + "mlp.gate_proj.weight", transposed(lp.w1));
      add(at + "mlp.up_proj.weight", transposed(lp.w3));
      add(at + "mlp.down_proj.weight", transposed(lp.w2));
      continue;
    }
    const std::string bm = at + "block_sparse_moe.";
    add(bm + "gate.weight", transposed(lp.moe.w_gate));
    const int64_t f = m.d_ff;
    for (int64_t e = 0; e < m.n_experts; ++e) {
      const std::string ex = fmt::format("{}experts.{}.", bm, e);
      add(ex + "w1.weight", transposed(lp.moe.w1.data<float>() + e * d * f, d, f, 0, f));
      add(ex + "w3.weight", transposed(lp.moe.w3.data<float>() + e * d * f, d, f, 0, f));
      add(ex + "w2.weight", transposed(lp.moe.w2.data<float>() + e * f * d, f, d, 0, d));
    }
  }

  ordered_json config = {{"architectures", {moe ? "MixtralForCausalLM" : "LlamaForCausalLM"}},
                         {"model_type", moe ? "mixtral" : "llama"},
                         {"vocab_size", V},
                         {"hidden_size", d},
                         {"intermediate_size", moe ? m.d_ff : cfg.d_ff},
                         {"num_hidden_layers", cfg.n_layers},
                         {"num_attention_heads", H},
                         {"num_key_value_heads", H},
                         {"head_dim", d / H},
                         {"hidden_act", "silu"},
                         {"max_position_embeddings", cfg.context},
                         {"rms_norm_eps", cfg.norm_eps},
                         {"rope_theta", cfg.rope_theta},
                         {"tie_word_embeddings", false},
                         {"attention_bias", false},
                         {"attention_dropout", 0.0},
                         {"bos_token_id", nullptr},
                         {"eos_token_id", nullptr},
                         {"torch_dtype", "float32"},
                         {"use_cache", true}};
  if (moe) {
    config["num_local_experts"] = m.n_experts;
    config["num_experts_per_tok"] = m.top_k;
    config["router_jitter_noise"] = 0.0;
    config["router_aux_loss_coef"] = m.loss_balance_weight;
    config["sliding_window"] = nullptr;
  } else {
    config["mlp_bias"] = false;
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw IoError(fmt::format("{}: cannot create: {}", out_dir, ec.message()));
  const fs::path dir(out_dir);
  std::vector<std::pair<std::string, const Tensor*>> list;
  for (const auto& [name, t] : out) list.emplace_back(name, &t);
  write_safetensors((dir / "model.safetensors").string(), list, {{"format", "pt"}});
  write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n");
  write_file_atomic((dir / "generation_config.json").string(),
                    ordered_json{{"_from_model_config", true}}.dump(2) + "\n");
  write_file_atomic((dir / "tokenizer.json").string(), byte_tokenizer_json() + "\n");
  write_file_atomic((dir / "tokenizer_config.json").string(),
                    ordered_json{{"tokenizer_class", "PreTrainedTokenizerFast"},
                                 {"model_max_length", cfg.context}}
                            .dump(2) +
                        "\n");
  return notes;
}

}  // namespace sy
