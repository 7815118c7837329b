#include "switchyard/train/routes.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <tuple>
#include <unordered_map>

#include "switchyard/core/rng.h"

namespace sy {

namespace {

struct Information {
  double mi = 0, hx = 0, hy = 0;
};

Information information(const std::vector<std::vector<double>>& joint) {
  double total = 0;
  std::vector<double> px(joint.size()), py;
  for (size_t x = 0; x < joint.size(); ++x) {
    if (py.size() < joint[x].size()) py.resize(joint[x].size());
    for (size_t y = 0; y < joint[x].size(); ++y) {
      px[x] += joint[x][y];
      py[y] += joint[x][y];
      total += joint[x][y];
    }
  }
  Information out;
  if (total <= 0) return out;
  auto entropy = [&](const std::vector<double>& p) {
    double h = 0;
    for (double v : p)
      if (v > 0) h -= v / total * std::log(v / total);
    return h;
  };
  out.hx = entropy(px), out.hy = entropy(py);
  for (size_t x = 0; x < joint.size(); ++x)
    for (size_t y = 0; y < joint[x].size(); ++y)
      if (joint[x][y] > 0) out.mi += joint[x][y] / total * std::log(joint[x][y] * total / (px[x] * py[y]));
  return out;
}

}  // namespace

double normalized_mutual_information(const std::vector<std::vector<double>>& joint) {
  const Information i = information(joint);
  if (i.hx <= 0 || i.hy <= 0) return 0;
  return std::clamp(2 * i.mi / (i.hx + i.hy), 0.0, 1.0);
}

double label_entropy_explained(const std::vector<std::vector<double>>& joint) {
  const Information i = information(joint);
  if (i.hx <= 0 || i.hy <= 0) return 0;
  return std::clamp(i.mi / i.hx, 0.0, 1.0);
}

int char_class(int byte) {
  if (byte >= 'a' && byte <= 'z') return 0;
  if (byte >= 'A' && byte <= 'Z') return 1;
  if (byte >= '0' && byte <= '9') return 2;
  if (byte == ' ' || byte == '\t') return 3;
  if (byte == '\n' || byte == '\r') return 4;
  if (byte < 0x80) return 5;
  if (byte < 0xC0) return 7;
  return 6;
}

const char* char_class_name(int cls) {
  static const char* names[kCharClasses] = {"lower-case letter", "upper-case letter", "digit",
                                            "space",             "newline",           "ASCII punctuation",
                                            "UTF-8 lead byte",   "UTF-8 continuation byte"};
  return cls >= 0 && cls < kCharClasses ? names[cls] : "?";
}

double load_cv(const std::vector<double>& load) {
  if (load.empty()) return 0;
  double mean = 0;
  for (double v : load) mean += v;
  mean /= double(load.size());
  if (mean == 0) return 0;
  double var = 0;
  for (double v : load) var += (v - mean) * (v - mean);
  return std::sqrt(var / double(load.size())) / mean;
}

namespace {

// The word each position belongs to: runs of letters (and apostrophes), lower-cased; other
// bytes belong to no word.
std::vector<std::string> words_at(const std::vector<int32_t>& tokens) {
  std::vector<std::string> out(tokens.size());
  size_t i = 0;
  while (i < tokens.size()) {
    if (!std::isalpha(tokens[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    std::string w;
    while (j < tokens.size() && (std::isalpha(tokens[j]) || tokens[j] == '\'')) w += char(std::tolower(tokens[j++]));
    for (size_t q = i; q < j; ++q) out[q] = w;
    i = j;
  }
  return out;
}

}  // namespace

namespace {

// What a route analysis records of a text, token by token, before it summarises: the same for
// Switchyard's byte models and for published models with their own tokenizers.
struct RouteRecord {
  int64_t E = 0, k = 0;
  std::vector<int64_t> layers;          // model index of each MoE layer
  std::vector<int32_t> byte;            // per token: its byte, or -1 when tokens are not bytes
  std::vector<int32_t> word;            // per token: index into words, -1 for none
  std::vector<std::string> words;
  std::unordered_map<std::string, int32_t> word_index;
  std::vector<std::array<int32_t, 3>> labels;  // per token: character class, document, script
  // [layer][token * k + j]: the expert of slot j (-1: a slot that took no expert) and whether it
  // was computed (not dropped).
  std::vector<std::vector<int32_t>> experts;
  std::vector<std::vector<uint8_t>> kept;
  std::vector<double> entropy_sum;  // [layer]: router entropy summed over tokens

  RouteRecord(int64_t n_experts, int64_t slots, std::vector<int64_t> moe_layers)
      : E(n_experts), k(slots), layers(std::move(moe_layers)), experts(layers.size()),
        kept(layers.size()), entropy_sum(layers.size()) {}
  void add_token(int32_t b, const std::string& w, std::array<int32_t, 3> label) {
    byte.push_back(b);
    labels.push_back(label);
    if (w.empty()) {
      word.push_back(-1);
      return;
    }
    auto [it, fresh] = word_index.try_emplace(w, int32_t(words.size()));
    if (fresh) words.push_back(w);
    word.push_back(it->second);
  }
  int64_t n_tokens() const { return int64_t(labels.size()); }
};

RouteAnalysis summarize_routes(const RouteRecord& r, const Corpus* corpus) {
  const int64_t E = r.E, k = r.k;
  const size_t L = r.layers.size();
  RouteAnalysis a;
  a.n_tokens = r.n_tokens();
  const bool labelled = corpus != nullptr && corpus->labelled();
  if (labelled) a.scripts = corpus->scripts();
  auto label_table = [](std::string kind, std::vector<std::string> names) {
    LabelRoutes t;
    t.kind = std::move(kind);
    t.names = std::move(names);
    return t;
  };
  std::vector<int64_t> byte_total(256), word_total(r.words.size());
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    if (r.byte[size_t(t)] >= 0) ++byte_total[size_t(r.byte[size_t(t)])];
    if (r.word[size_t(t)] >= 0) ++word_total[size_t(r.word[size_t(t)])];
  }
  for (size_t l = 0; l < L; ++l) {
    LayerRoutes lr;
    lr.layer = r.layers[l];
    lr.experts.resize(size_t(E));
    lr.co_selected.assign(size_t(E), std::vector<int64_t>(size_t(E)));
    std::vector<std::string> classes;
    for (int c = 0; c < kCharClasses; ++c) classes.push_back(char_class_name(c));
    lr.labels.push_back(label_table("character class", classes));
    if (labelled) {
      std::vector<std::string> ids;
      for (const CorpusDoc& d : corpus->docs) ids.push_back(d.id);
      lr.labels.push_back(label_table("language", ids));
      lr.labels.back().group = corpus->doc_scripts();
      lr.labels.push_back(label_table("script", a.scripts));
    }
    std::vector<std::vector<int64_t>> byte_count(size_t(E), std::vector<int64_t>(256));
    std::vector<std::unordered_map<int32_t, int64_t>> word_count(static_cast<size_t>(E));
    double slots_all = 0, dropped_all = 0;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
      std::vector<int32_t> chosen;
      for (int64_t j = 0; j < k; ++j) {
        const size_t slot = size_t(t * k + j);
        const int32_t e = r.experts[l][slot];
        if (e < 0) continue;
        const bool kept = r.kept[l][slot] != 0;
        ExpertProfile& ep = lr.experts[size_t(e)];
        ++ep.slots;
        ep.kept += kept;
        slots_all += 1;
        dropped_all += !kept;
        chosen.push_back(e);
        if (r.byte[size_t(t)] >= 0) ++byte_count[size_t(e)][size_t(r.byte[size_t(t)])];
        if (r.word[size_t(t)] >= 0) ++word_count[size_t(e)][r.word[size_t(t)]];
      }
      for (size_t x = 0; x < chosen.size(); ++x)
        for (size_t y = 0; y < chosen.size(); ++y)
          if (x != y) ++lr.co_selected[size_t(chosen[x])][size_t(chosen[y])];
    }
    lr.entropy = a.n_tokens > 0 ? r.entropy_sum[l] / double(a.n_tokens) : 0;
    lr.dropped_fraction = slots_all > 0 ? dropped_all / slots_all : 0;
    std::vector<double> load;
    for (const ExpertProfile& ep : lr.experts) load.push_back(double(ep.slots));
    lr.load_cv = load_cv(load);
    for (size_t kind = 0; kind < lr.labels.size(); ++kind) {
      LabelRoutes& t = lr.labels[kind];
      std::vector<int32_t> label;
      for (const auto& tl : r.labels) label.push_back(tl[kind]);
      // Each token's label against the experts it chose: the table, then again with the labels
      // shuffled (Fisher-Yates on a fixed stream: the same chance level on every run).
      auto table = [&](const std::vector<int32_t>& of_token) {
        std::vector<std::vector<double>> out(t.names.size(), std::vector<double>(size_t(E)));
        for (size_t i = 0; i < of_token.size(); ++i)
          for (int64_t j = 0; j < k; ++j)
            if (const int32_t e = r.experts[l][i * size_t(k) + size_t(j)]; e >= 0)
              out[size_t(of_token[i])][size_t(e)] += 1;
        return out;
      };
      t.slots = table(label);
      t.nmi = normalized_mutual_information(t.slots);
      t.explained = label_entropy_explained(t.slots);
      const Philox rng(0x5EED, 0xC4A0CE + kind);
      for (size_t i = label.size(); i > 1; --i) {
        const auto w = rng.bits(uint64_t(l) << 40 | i);
        std::swap(label[i - 1], label[(uint64_t(w[0]) << 32 | w[1]) % i]);
      }
      t.nmi_chance = normalized_mutual_information(table(label));
    }
    for (int64_t e = 0; e < E; ++e) {
      ExpertProfile& ep = lr.experts[size_t(e)];
      if (ep.slots == 0) continue;
      // Lift: the share of a byte's (word's) occurrences this expert took, over its share of
      // all slots. Bytes and words seen fewer than 20 times are too rare to judge.
      const double base = double(ep.slots) / double(a.n_tokens);
      for (int c = 0; c < 256; ++c)
        if (byte_total[size_t(c)] >= 20)
          ep.top_bytes.push_back({c, double(byte_count[size_t(e)][size_t(c)]) / double(byte_total[size_t(c)]) / base});
      for (const auto& [w, n] : word_count[size_t(e)])
        if (word_total[size_t(w)] >= 20)
          ep.top_words.push_back({r.words[size_t(w)], double(n) / double(word_total[size_t(w)]) / base});
      // Highest lift first; among equal lifts (a byte or word the expert took every time) the
      // more frequent one, which says more about the expert than a rare one.
      std::sort(ep.top_bytes.begin(), ep.top_bytes.end(), [&](const auto& x, const auto& y) {
        if (x.second != y.second) return x.second > y.second;
        if (byte_total[size_t(x.first)] != byte_total[size_t(y.first)])
          return byte_total[size_t(x.first)] > byte_total[size_t(y.first)];
        return x.first < y.first;
      });
      auto total_of = [&](const std::string& w) { return word_total[size_t(r.word_index.at(w))]; };
      std::sort(ep.top_words.begin(), ep.top_words.end(), [&](const auto& x, const auto& y) {
        if (x.second != y.second) return x.second > y.second;
        if (total_of(x.first) != total_of(y.first)) return total_of(x.first) > total_of(y.first);
        return x.first < y.first;
      });
      if (ep.top_bytes.size() > 8) ep.top_bytes.resize(8);
      if (ep.top_words.size() > 8) ep.top_words.resize(8);
    }
    a.layers.push_back(std::move(lr));
  }
  return a;
}

}  // namespace

RouteAnalysis analyze_routes(const LanguageModel& model, const LmParams& p,
                             const std::vector<Batch>& batches, const ExecContext& ctx,
                             const Corpus* corpus) {
  const LmConfig& cfg = model.config();
  const int64_t E = cfg.moe.n_experts, k = cfg.moe.slots_per_token();
  ExecContext eval = ctx;
  eval.training = false;
  std::vector<int64_t> moe_layers;
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    if (cfg.is_moe(i)) moe_layers.push_back(i);
  RouteRecord r(E, k, moe_layers);
  const bool labelled = corpus != nullptr && corpus->labelled();
  const std::vector<int32_t> script_of = labelled ? corpus->doc_scripts() : std::vector<int32_t>{};
  LmCache cache;
  for (const Batch& b : batches) {
    model.forward(p, b.tokens, b.targets, b.n_seq, cache, eval);
    const std::vector<std::string> words = words_at(b.tokens);
    const int64_t T = int64_t(b.tokens.size());
    if (labelled && b.doc.size() != b.tokens.size())
      throw ShapeError("analyze_routes: a labelled corpus's batches without document labels "
                       "(expected its val_batches)");
    // Padding after a document's end is not text: it is left out of every statistic.
    auto padding = [&](int64_t t) { return !b.doc.empty() && b.doc[size_t(t)] < 0; };
    for (int64_t t = 0; t < T; ++t) {
      if (padding(t)) continue;
      const int32_t d = labelled ? b.doc[size_t(t)] : 0;
      r.add_token(b.tokens[t], words[t],
                  {char_class(b.tokens[t]), d, labelled ? script_of[size_t(d)] : 0});
    }
    for (size_t l = 0; l < moe_layers.size(); ++l) {
      const MoeCache& mc = cache.layers[size_t(moe_layers[l])].moe;
      const auto probs = mc.router.probs.matrix<float>();
      for (int64_t t = 0; t < T; ++t) {
        if (padding(t)) continue;
        for (int64_t j = 0; j < k; ++j) {
          const size_t slot = size_t(t * k + j);
          const bool kept = mc.plan.slot_row[slot] >= 0;
          // Expert choice offers every token to every expert: only taken slots count.
          const bool counts = cfg.moe.gating != Gating::kExpertChoice || kept;
          r.experts[l].push_back(counts ? mc.router.expert[slot] : -1);
          r.kept[l].push_back(kept);
        }
        for (int64_t e = 0; e < E; ++e) {
          const double q = probs(t, e);
          if (q > 0) r.entropy_sum[l] -= q * std::log(q);
        }
      }
    }
  }
  return summarize_routes(r, corpus);
}

RouteAnalysis analyze_decoder_routes(const DecoderModel& model, const DecoderParams& p,
                                     const Tokenizer& tok, std::span<const int32_t> ids,
                                     int64_t window, const ExecContext& ctx) {
  const DecoderConfig& cfg = model.config();
  if (cfg.n_moe_layers() == 0) throw ConfigError("analyze_decoder_routes: a dense model has no routes");
  if (window < 1) throw ConfigError(fmt::format("route window {}: expected >= 1", window));
  const int64_t E = cfg.moe.n_experts, k = cfg.moe.slots_per_token();
  std::vector<int64_t> moe_layers;
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    if (cfg.moe_layer[size_t(i)]) moe_layers.push_back(i);
  RouteRecord r(E, k, moe_layers);
  // A token's word is its own text, trimmed and lower-cased; its class, that of its first
  // byte that is not a space (a token of spaces alone: its first byte's).
  std::unordered_map<int32_t, std::pair<std::string, int32_t>> seen;
  auto describe = [&](int32_t id) -> const std::pair<std::string, int32_t>& {
    auto it = seen.find(id);
    if (it != seen.end()) return it->second;
    const std::string text = tok.decode(std::vector<int32_t>{id}, /*skip_special_tokens=*/false);
    size_t a = 0, e = text.size();
    while (a < e && std::isspace(static_cast<unsigned char>(text[a]))) ++a;
    while (e > a && std::isspace(static_cast<unsigned char>(text[e - 1]))) --e;
    std::string w = text.substr(a, e - a);
    for (char& ch : w) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    const int32_t cls =
        text.empty() ? 5 : char_class(static_cast<unsigned char>(text[a < text.size() ? a : 0]));
    return seen.emplace(id, std::pair{w, cls}).first->second;
  };
  ExecContext eval = ctx;
  eval.training = false;
  Tensor logits;
  for (size_t at = 0; at < ids.size(); at += size_t(window)) {
    const std::span<const int32_t> w = ids.subspan(at, std::min(ids.size() - at, size_t(window)));
    DecoderState s = model.start();
    model.forward(p, w, s, logits, eval, /*all_positions=*/false);
    for (int32_t id : w) {
      const auto& [word, cls] = describe(id);
      r.add_token(-1, word, {cls, 0, 0});
    }
    for (size_t l = 0; l < moe_layers.size(); ++l) {
      const std::vector<int32_t>& ex = model.last_experts()[l];
      r.experts[l].insert(r.experts[l].end(), ex.begin(), ex.end());
      r.kept[l].insert(r.kept[l].end(), ex.size(), uint8_t(1));
      r.entropy_sum[l] += model.last_routing()[l].router_entropy * double(w.size());
    }
  }
  return summarize_routes(r, nullptr);
}

std::string escape_html(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return out;
}

namespace {

std::string show_byte(int c) {
  if (c == ' ') return "' '";
  if (c == '\n') return "\\n";
  if (c >= 33 && c < 127) return std::string(1, char(c));
  return fmt::format("\\x{:02x}", c);
}

// The n largest entries of a row as (index, share of the row's sum), largest first.
std::vector<std::pair<int, double>> top_shares(const std::vector<double>& row, size_t n) {
  double sum = 0;
  for (double v : row) sum += v;
  std::vector<std::pair<int, double>> out;
  for (size_t i = 0; i < row.size(); ++i)
    if (row[i] > 0) out.push_back({int(i), row[i] / sum});
  std::stable_sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.second > y.second; });
  if (out.size() > n) out.resize(n);
  return out;
}

// Column e of a label table as a row: how expert e's slots spread over the labels.
std::vector<double> column(const LabelRoutes& t, size_t e) {
  std::vector<double> out;
  for (const auto& row : t.slots) out.push_back(row[e]);
  return out;
}

std::string nmi_line(const LayerRoutes& lr) {
  std::string out = "normalised mutual information between expert choice and";
  for (size_t i = 0; i < lr.labels.size(); ++i)
    out += fmt::format("{} {}: {:.3f}", i ? "," : "", lr.labels[i].kind, lr.labels[i].nmi);
  out += " (shuffled labels:";
  for (size_t i = 0; i < lr.labels.size(); ++i) out += fmt::format("{} {:.3f}", i ? "," : "", lr.labels[i].nmi_chance);
  out += "); share of the label's entropy the expert explains:";
  for (size_t i = 0; i < lr.labels.size(); ++i)
    out += fmt::format("{} {} {:.3f}", i ? "," : "", lr.labels[i].kind, lr.labels[i].explained);
  return out;
}

// What each script's tokens choose, and whose tokens each expert gets: the labelled corpus's
// specialisation in a few lines per layer.
std::string specialisation_text(const LayerRoutes& lr, size_t max_scripts) {
  std::string out = nmi_line(lr) + "\n";
  if (lr.labels.size() < 3) return out;
  const LabelRoutes &lang = lr.labels[1], &script = lr.labels[2];
  out += "script (languages): experts chosen, share of its slots\n";
  for (size_t s = 0; s < std::min(max_scripts, script.names.size()); ++s) {
    int64_t n = 0;
    for (int32_t g : lang.group) n += g == int32_t(s);
    std::string row;
    for (const auto& [e, share] : top_shares(script.slots[s], 4)) row += fmt::format(" {}:{:.0f}%", e, 100 * share);
    out += fmt::format("  {:<20} ({:>3}){}\n", script.names[s], n, row);
  }
  out += "expert: languages served most, share of its slots\n";
  for (size_t e = 0; e < lang.slots.front().size(); ++e) {
    std::string row;
    for (const auto& [d, share] : top_shares(column(lang, e), 4))
      row += fmt::format(" {} ({}) {:.1f}%", lang.names[size_t(d)], script.names[size_t(lang.group[size_t(d)])], 100 * share);
    out += fmt::format("  {:>4}{}\n", e, row);
  }
  return out;
}

}  // namespace

namespace {
void put_be32(std::string& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out += char((v >> s) & 0xFF);
}

}  // namespace

// zlib for the pixel stream and the chunk CRCs, so that a large heatmap is a few kilobytes in
// the report instead of one SVG element per cell.
std::string png_data_uri(uint32_t w, uint32_t h, const std::vector<uint8_t>& rgb) {
  std::string raw;
  for (uint32_t y = 0; y < h; ++y) {
    raw += '\0';  // filter: none
    raw.append(reinterpret_cast<const char*>(rgb.data()) + size_t(y) * w * 3, size_t(w) * 3);
  }
  uLongf packed_len = compressBound(uLong(raw.size()));
  std::string packed(packed_len, '\0');
  if (compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_len,
                reinterpret_cast<const Bytef*>(raw.data()), uLong(raw.size()), 9) != Z_OK)
    throw Error("routes: zlib could not compress a heatmap image");
  packed.resize(packed_len);
  std::string png = "\x89PNG\r\n\x1a\n";
  auto chunk = [&](const char* type, const std::string& data) {
    put_be32(png, uint32_t(data.size()));
    const std::string body = std::string(type, 4) + data;
    png += body;
    put_be32(png, uint32_t(crc32(0, reinterpret_cast<const Bytef*>(body.data()), uInt(body.size()))));
  };
  std::string ihdr;
  put_be32(ihdr, w);
  put_be32(ihdr, h);
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB, deflate, no filter, no interlace
  chunk("IHDR", ihdr);
  chunk("IDAT", packed);
  chunk("IEND", "");
  static const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out = "data:image/png;base64,";
  for (size_t i = 0; i < png.size(); i += 3) {
    const uint32_t v = uint32_t(uint8_t(png[i])) << 16 |
                       (i + 1 < png.size() ? uint32_t(uint8_t(png[i + 1])) << 8 : 0) |
                       (i + 2 < png.size() ? uint32_t(uint8_t(png[i + 2])) : 0);
    out += b64[v >> 18 & 63];
    out += b64[v >> 12 & 63];
    out += i + 1 < png.size() ? b64[v >> 6 & 63] : '=';
    out += i + 2 < png.size() ? b64[v & 63] : '=';
  }
  return out;
}

namespace {

// Label x expert heatmap: each row the label's slots over the experts as shares, coloured
// against the table's largest share. Rows of a grouped table (languages) run group by group,
// with the group's name where it has room.
std::string label_heatmap(const LabelRoutes& t, const std::vector<std::string>& group_names,
                          double row_h, double cell_w) {
  const size_t n = t.slots.size(), E = n ? t.slots.front().size() : 0;
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  if (!t.group.empty())
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return t.group[x] < t.group[y]; });
  std::vector<std::vector<double>> share(n, std::vector<double>(E));
  double top = 1e-12;
  for (size_t i = 0; i < n; ++i) {
    double sum = 0;
    for (double v : t.slots[i]) sum += v;
    for (size_t e = 0; e < E; ++e) share[i][e] = sum > 0 ? t.slots[i][e] / sum : 0;
    for (double v : share[i]) top = std::max(top, v);
  }
  const double left = 150, head = 28;
  // Many rows (languages): the cells as one image, one pixel each, drawn under the labels.
  const bool image = n > 64;
  std::vector<uint8_t> pixels(image ? n * E * 3 : 0);
  std::string overlay;  // group lines and names, drawn over the cells
  std::string svg = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-size='10' "
      "font-family='sans-serif'><text x='{}' y='10'>expert →</text>",
      left + cell_w * double(E) + 10, head + row_h * double(n) + 10, left);
  for (size_t e = 0; e < E; e += (E > 16 ? 4 : 1))
    svg += fmt::format("<text x='{}' y='24' text-anchor='middle'>{}</text>", left + cell_w * (double(e) + 0.5), e);
  for (size_t r = 0; r < n; ++r) {
    const size_t i = order[r];
    const double y = head + row_h * double(r);
    const bool starts = !t.group.empty() && (r == 0 || t.group[order[r - 1]] != t.group[i]);
    if (t.group.empty()) {
      svg += fmt::format("<text x='{}' y='{}' text-anchor='end'>{}</text>", left - 4, y + row_h - 2, escape_html(t.names[i]));
    } else if (starts) {
      size_t len = 0;
      while (r + len < n && t.group[order[r + len]] == t.group[i]) ++len;
      overlay += fmt::format("<line x1='0' x2='{}' y1='{}' y2='{}' stroke='#999'/>", left + cell_w * double(E), y, y);
      if (double(len) * row_h >= 10)
        overlay += fmt::format("<text x='{}' y='{}' text-anchor='end'>{} ({})</text>", left - 4, y + 10,
                           escape_html(group_names[size_t(t.group[i])]), len);
    }
    if (image) {
      for (size_t e = 0; e < E; ++e) {
        const uint8_t c = uint8_t(255 * (1 - std::min(1.0, share[i][e] / top)));
        const size_t at = (r * E + e) * 3;
        pixels[at] = c, pixels[at + 1] = c, pixels[at + 2] = 255;
      }
      continue;
    }
    for (size_t e = 0; e < E; ++e) {
      const int c = int(255 * (1 - std::min(1.0, share[i][e] / top)));
      svg += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='rgb({},{},255)'><title>{}: "
                         "expert {} {:.1f}%</title></rect>",
                         left + cell_w * double(e), y, cell_w, row_h, c, c, escape_html(t.names[i]), e, 100 * share[i][e]);
    }
  }
  if (image)
    svg += fmt::format("<image x='{}' y='{}' width='{}' height='{}' preserveAspectRatio='none' "
                       "style='image-rendering:pixelated' href='{}'/>",
                       left, head, cell_w * double(E), row_h * double(n),
                       png_data_uri(uint32_t(E), uint32_t(n), pixels));
  return svg + overlay + "</svg>";
}

}  // namespace

std::string render_routes_text(const RouteAnalysis& a) {
  std::string out = fmt::format("{} tokens\n", a.n_tokens);
  for (const LayerRoutes& lr : a.layers) {
    const int64_t E = int64_t(lr.experts.size());
    int64_t total = 0;
    for (const auto& ep : lr.experts) total += ep.slots;
    out += fmt::format("\nlayer {}: load CV {:.3f}, dropped {:.2f}%, router entropy {:.3f} nats (max {:.3f})\n",
                       lr.layer, lr.load_cv, 100 * lr.dropped_fraction, lr.entropy, std::log(double(E)));
    out += "expert  load%  histogram                 kept%  top bytes (lift)        top words (lift)\n";
    for (int64_t e = 0; e < E; ++e) {
      const ExpertProfile& ep = lr.experts[size_t(e)];
      const double share = total > 0 ? double(ep.slots) / double(total) : 0;
      const int bar = int(std::lround(share * double(E) * 10));  // 10 chars = the balanced share
      std::string bytes, words;
      for (size_t i = 0; i < std::min<size_t>(4, ep.top_bytes.size()); ++i)
        bytes += fmt::format("{}{}({:.1f})", i ? " " : "", show_byte(ep.top_bytes[i].first), ep.top_bytes[i].second);
      for (size_t i = 0; i < std::min<size_t>(4, ep.top_words.size()); ++i)
        words += fmt::format("{}{}({:.1f})", i ? " " : "", ep.top_words[i].first, ep.top_words[i].second);
      out += fmt::format("{:>6}  {:>5.1f}  {:<24}  {:>5.1f}  {:<22}  {}\n", e, 100 * share,
                         std::string(size_t(std::min(bar, 24)), '#'),
                         ep.slots > 0 ? 100.0 * double(ep.kept) / double(ep.slots) : 0.0, bytes, words);
    }
    const double per_token = 100.0 / double(std::max<int64_t>(1, a.n_tokens));
    if (E <= 16) {
      out += "co-selection (tokens that chose both, % of tokens):\n      ";
      for (int64_t e = 0; e < E; ++e) out += fmt::format("{:>6}", e);
      out += "\n";
      for (int64_t x = 0; x < E; ++x) {
        out += fmt::format("{:>6}", x);
        for (int64_t y = 0; y < E; ++y)
          out += x == y ? fmt::format("{:>6}", "-")
                        : fmt::format("{:>6.1f}", per_token * double(lr.co_selected[size_t(x)][size_t(y)]));
        out += "\n";
      }
    } else {
      // A matrix of E^2 cells says nothing at a glance: the pairs chosen together most.
      std::vector<std::tuple<int64_t, int64_t, int64_t>> pairs;
      for (int64_t x = 0; x < E; ++x)
        for (int64_t y = x + 1; y < E; ++y)
          if (lr.co_selected[size_t(x)][size_t(y)] > 0) pairs.emplace_back(lr.co_selected[size_t(x)][size_t(y)], x, y);
      std::sort(pairs.begin(), pairs.end(), [](const auto& p, const auto& q) {
        return std::get<0>(p) != std::get<0>(q) ? std::get<0>(p) > std::get<0>(q) : p < q;
      });
      out += "co-selection, the pairs most often chosen together (% of tokens):";
      for (size_t i = 0; i < std::min<size_t>(16, pairs.size()); ++i)
        out += fmt::format(" {}+{} {:.1f}", std::get<1>(pairs[i]), std::get<2>(pairs[i]), per_token * double(std::get<0>(pairs[i])));
      out += "\n";
    }
    out += specialisation_text(lr, 12);
  }
  return out;
}

std::string render_routes_html(const RouteAnalysis& a, const std::string& title) {
  std::string html = fmt::format(
      "<!doctype html><html><head><meta charset='utf-8'><title>Routes: {0}</title><style>"
      "body{{font-family:sans-serif;margin:24px;max-width:1100px}}td,th{{padding:2px 8px}}"
      "td{{text-align:right}}td.l{{text-align:left;font-family:monospace}}</style></head><body>"
      "<h1>Routing of {0}</h1><p>{1} tokens of validation text.</p>",
      escape_html(title), a.n_tokens);
  for (const LayerRoutes& lr : a.layers) {
    const int64_t E = int64_t(lr.experts.size());
    int64_t total = 0, co_max = 1;
    for (const auto& ep : lr.experts) total += ep.slots;
    for (const auto& row : lr.co_selected)
      for (int64_t v : row) co_max = std::max(co_max, v);
    html += fmt::format("<h2>Layer {}</h2><p>load CV {:.3f}; dropped {:.2f}% of slots; router "
                        "entropy {:.3f} nats (uniform: {:.3f})</p>",
                        lr.layer, lr.load_cv, 100 * lr.dropped_fraction, lr.entropy, std::log(double(E)));
    // Load histogram.
    const double bw = 36, bh = 120;
    html += fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-size='10' font-family='sans-serif'>",
                        60 + bw * double(E), bh + 40);
    const double balanced = 1.0 / double(E);
    double max_share = 2 * balanced;
    for (const auto& ep : lr.experts) max_share = std::max(max_share, double(ep.slots) / double(std::max<int64_t>(1, total)));
    for (int64_t e = 0; e < E; ++e) {
      const double share = double(lr.experts[size_t(e)].slots) / double(std::max<int64_t>(1, total));
      const double h = share / max_share * bh;
      html += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='#4e79a7'/><text x='{}' y='{}' text-anchor='middle'>{}</text>",
                          50 + bw * double(e), 10 + bh - h, bw - 6, h, 50 + bw * double(e) + (bw - 6) / 2, bh + 24, e);
    }
    const double yb = 10 + bh - balanced / max_share * bh;
    html += fmt::format("<line x1='46' x2='{}' y1='{}' y2='{}' stroke='#e15759' stroke-dasharray='4'/><text x='2' y='{}'>1/E</text>"
                        "<text x='2' y='{}'>load</text></svg>",
                        50 + bw * double(E), yb, yb, yb + 3, bh + 36);
    // Co-selection heatmap.
    const double cs = 28;
    html += fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-size='10' font-family='sans-serif'>"
                        "<text x='0' y='12'>co-selection</text>",
                        40 + cs * double(E), 40 + cs * double(E));
    for (int64_t x = 0; x < E; ++x) {
      html += fmt::format("<text x='{}' y='30' text-anchor='middle'>{}</text><text x='20' y='{}' text-anchor='end'>{}</text>",
                          30 + cs * double(x) + cs / 2, x, 34 + cs * double(x) + cs / 2 + 3, x);
      for (int64_t y = 0; y < E; ++y) {
        const double v = x == y ? 0 : double(lr.co_selected[size_t(x)][size_t(y)]) / double(co_max);
        const int c = int(255 * (1 - v));
        html += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='rgb({},{},255)'><title>{} & {}: {} tokens</title></rect>",
                            30 + cs * double(y), 34 + cs * double(x), cs - 1, cs - 1, c, c, x, y,
                            lr.co_selected[size_t(x)][size_t(y)]);
      }
    }
    html += "</svg>";
    html += "<table><tr><th>expert</th><th>load %</th><th>kept %</th><th>top bytes (lift)</th><th>top words (lift)</th></tr>";
    for (int64_t e = 0; e < E; ++e) {
      const ExpertProfile& ep = lr.experts[size_t(e)];
      std::string bytes, words;
      for (const auto& [c, lift] : ep.top_bytes) bytes += fmt::format("{} {:.1f}&nbsp; ", escape_html(show_byte(c)), lift);
      for (const auto& [w, lift] : ep.top_words) words += fmt::format("{} {:.1f}&nbsp; ", escape_html(w), lift);
      html += fmt::format("<tr><td>{}</td><td>{:.1f}</td><td>{:.1f}</td><td class='l'>{}</td><td class='l'>{}</td></tr>", e,
                          100.0 * double(ep.slots) / double(std::max<int64_t>(1, total)),
                          ep.slots > 0 ? 100.0 * double(ep.kept) / double(ep.slots) : 0.0, bytes, words);
    }
    html += "</table>";
    html += fmt::format("<p>{}.</p>", escape_html(nmi_line(lr)));
    for (const LabelRoutes& t : lr.labels) {
      if (t.kind == "character class") continue;
      const bool grouped = !t.group.empty();
      html += fmt::format("<h3>Layer {}: {} x expert (share of each {}'s slots{})</h3>", lr.layer,
                          t.kind, t.kind, grouped ? ", grouped by script" : "");
      html += label_heatmap(t, a.scripts, grouped ? 2.0 : 12.0, E > 32 ? 6.0 : 12.0);
    }
    html += fmt::format("<h3>Layer {}: character class x expert</h3>", lr.layer);
    html += label_heatmap(lr.labels.front(), {}, 12.0, E > 32 ? 6.0 : 12.0);
  }
  return html + "</body></html>\n";
}

}  // namespace sy
