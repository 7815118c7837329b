#include "switchyard/train/routes.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <unordered_map>

namespace sy {

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

RouteAnalysis analyze_routes(const LanguageModel& model, const LmParams& p,
                             const std::vector<Batch>& batches, const ExecContext& ctx) {
  const LmConfig& cfg = model.config();
  const int64_t E = cfg.moe.n_experts, k = cfg.moe.slots_per_token();
  ExecContext eval = ctx;
  eval.training = false;
  RouteAnalysis a;
  std::vector<int64_t> moe_layers;
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    if (cfg.is_moe(i)) moe_layers.push_back(i);
  const size_t L = moe_layers.size();
  // Per layer: slots and kept per expert, co-selection, entropy sum, byte and word counts.
  std::vector<std::vector<std::vector<int64_t>>> byte_count(L, std::vector<std::vector<int64_t>>(size_t(E), std::vector<int64_t>(256)));
  std::vector<std::vector<std::unordered_map<std::string, int64_t>>> word_count(L, std::vector<std::unordered_map<std::string, int64_t>>(size_t(E)));
  std::vector<int64_t> byte_total(256);
  std::unordered_map<std::string, int64_t> word_total;
  std::vector<double> entropy_sum(L), slots_all(L), dropped_all(L);
  for (int64_t li : moe_layers) {
    LayerRoutes lr;
    lr.layer = li;
    lr.experts.resize(size_t(E));
    lr.co_selected.assign(size_t(E), std::vector<int64_t>(size_t(E)));
    a.layers.push_back(std::move(lr));
  }
  LmCache cache;
  for (const Batch& b : batches) {
    model.forward(p, b.tokens, b.targets, b.n_seq, cache, eval);
    const std::vector<std::string> words = words_at(b.tokens);
    const int64_t T = int64_t(b.tokens.size());
    a.n_tokens += T;
    for (int64_t t = 0; t < T; ++t) {
      ++byte_total[size_t(b.tokens[t])];
      if (!words[t].empty()) ++word_total[words[t]];
    }
    for (size_t l = 0; l < L; ++l) {
      const MoeCache& mc = cache.layers[size_t(moe_layers[l])].moe;
      LayerRoutes& lr = a.layers[l];
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int32_t> chosen;
        for (int64_t j = 0; j < k; ++j) {
          const size_t slot = size_t(t * k + j);
          const bool kept = mc.plan.slot_row[slot] >= 0;
          // Expert choice offers every token to every expert: only taken slots count.
          if (cfg.moe.gating == Gating::kExpertChoice && !kept) continue;
          const int32_t e = mc.router.expert[slot];
          ExpertProfile& ep = lr.experts[size_t(e)];
          ++ep.slots;
          ep.kept += kept;
          slots_all[l] += 1;
          dropped_all[l] += !kept;
          chosen.push_back(e);
          ++byte_count[l][size_t(e)][size_t(b.tokens[t])];
          if (!words[t].empty()) ++word_count[l][size_t(e)][words[t]];
        }
        for (size_t x = 0; x < chosen.size(); ++x)
          for (size_t y = 0; y < chosen.size(); ++y)
            if (x != y) ++lr.co_selected[size_t(chosen[x])][size_t(chosen[y])];
      }
      // Router entropy per token, from the cached probabilities.
      const auto probs = mc.router.probs.matrix<float>();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
          const double q = probs(t, e);
          if (q > 0) entropy_sum[l] -= q * std::log(q);
        }
    }
  }
  for (size_t l = 0; l < L; ++l) {
    LayerRoutes& lr = a.layers[l];
    lr.entropy = a.n_tokens > 0 ? entropy_sum[l] / double(a.n_tokens) : 0;
    lr.dropped_fraction = slots_all[l] > 0 ? dropped_all[l] / slots_all[l] : 0;
    std::vector<double> load;
    for (const ExpertProfile& ep : lr.experts) load.push_back(double(ep.slots));
    lr.load_cv = load_cv(load);
    for (int64_t e = 0; e < E; ++e) {
      ExpertProfile& ep = lr.experts[size_t(e)];
      if (ep.slots == 0) continue;
      // Lift: the share of a byte's (word's) occurrences this expert took, over its share of
      // all slots. Bytes and words seen fewer than 20 times are too rare to judge.
      const double base = double(ep.slots) / double(a.n_tokens);
      for (int c = 0; c < 256; ++c)
        if (byte_total[size_t(c)] >= 20)
          ep.top_bytes.push_back({c, double(byte_count[l][size_t(e)][size_t(c)]) / double(byte_total[size_t(c)]) / base});
      for (const auto& [w, n] : word_count[l][size_t(e)])
        if (word_total[w] >= 20) ep.top_words.push_back({w, double(n) / double(word_total[w]) / base});
      // Highest lift first; among equal lifts (a byte or word the expert took every time) the
      // more frequent one, which says more about the expert than a rare one.
      std::sort(ep.top_bytes.begin(), ep.top_bytes.end(), [&](const auto& x, const auto& y) {
        if (x.second != y.second) return x.second > y.second;
        if (byte_total[size_t(x.first)] != byte_total[size_t(y.first)])
          return byte_total[size_t(x.first)] > byte_total[size_t(y.first)];
        return x.first < y.first;
      });
      std::sort(ep.top_words.begin(), ep.top_words.end(), [&](const auto& x, const auto& y) {
        if (x.second != y.second) return x.second > y.second;
        if (word_total[x.first] != word_total[y.first]) return word_total[x.first] > word_total[y.first];
        return x.first < y.first;
      });
      if (ep.top_bytes.size() > 8) ep.top_bytes.resize(8);
      if (ep.top_words.size() > 8) ep.top_words.resize(8);
    }
  }
  return a;
}

namespace {

std::string show_byte(int c) {
  if (c == ' ') return "' '";
  if (c == '\n') return "\\n";
  if (c >= 33 && c < 127) return std::string(1, char(c));
  return fmt::format("\\x{:02x}", c);
}

std::string escape_html(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return out;
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
    out += "co-selection (tokens that chose both, % of tokens):\n      ";
    for (int64_t e = 0; e < E; ++e) out += fmt::format("{:>6}", e);
    out += "\n";
    for (int64_t x = 0; x < E; ++x) {
      out += fmt::format("{:>6}", x);
      for (int64_t y = 0; y < E; ++y)
        out += x == y ? fmt::format("{:>6}", "-")
                      : fmt::format("{:>6.1f}", 100.0 * double(lr.co_selected[size_t(x)][size_t(y)]) / double(std::max<int64_t>(1, a.n_tokens)));
      out += "\n";
    }
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
  }
  return html + "</body></html>\n";
}

}  // namespace sy
