// The training report: one self-contained HTML file with inline SVG (no scripts, no network).
#include <algorithm>
#include <cmath>

#include "switchyard/train/trainer.h"

namespace sy {

namespace {

struct Series {
  std::string name, color;
  std::vector<std::pair<double, double>> points;
};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

std::string line_plot(const std::string& title, const std::string& ylabel,
                      const std::vector<Series>& series) {
  const double W = 680, H = 300, L = 60, R = 130, T = 30, B = 40;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Series& s : series)
    for (auto [x, y] : s.points)
      if (std::isfinite(y)) {
        x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
      }
  std::string svg = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='11'><text x='{}' y='18' font-size='13' font-weight='bold'>{}</text>",
      W, H, L, escape(title));
  if (!std::isfinite(x0)) return svg + "<text x='60' y='60'>no data</text></svg>";
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };
  svg += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>", L,
                     T, W - L - R, H - T - B);
  for (int i = 0; i <= 4; ++i) {
    const double y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    svg += fmt::format("<text x='{}' y='{}' text-anchor='end'>{:.3g}</text>", L - 4, py(y) + 4, y);
    svg += fmt::format("<line x1='{}' x2='{}' y1='{}' y2='{}' stroke='#eee'/>", L, W - R, py(y), py(y));
    svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{:.0f}</text>", px(x), H - B + 14, x);
  }
  svg += fmt::format("<text x='{}' y='{}' text-anchor='middle'>step</text>", (L + W - R) / 2, H - 6);
  svg += fmt::format("<text x='14' y='{}' transform='rotate(-90 14 {})' text-anchor='middle'>{}</text>",
                     (T + H - B) / 2, (T + H - B) / 2, escape(ylabel));
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    std::string d;
    for (auto [x, y] : s.points)
      if (std::isfinite(y)) d += fmt::format("{}{:.1f},{:.1f}", d.empty() ? "M" : " L", px(x), py(y));
    svg += fmt::format("<path d='{}' fill='none' stroke='{}' stroke-width='1.5'/>", d, s.color);
    svg += fmt::format("<text x='{}' y='{}' fill='{}'>{}</text>", W - R + 8, T + 14 + 16 * k,
                       s.color, escape(s.name));
  }
  return svg + "</svg>";
}

// Experts (rows) over training (columns): share of routed slots relative to the balanced 1/E.
std::string load_heatmap(const std::string& title, const TrainHistory& h, size_t layer) {
  const size_t n = h.steps.size();
  if (n == 0 || h.steps[0].load.size() <= layer) return "";
  const size_t E = h.steps[0].load[layer].size();
  const size_t cols = std::min<size_t>(n, 120);
  const double cw = 4, ch = 14, L = 60, T = 28;
  std::string svg = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='11'><text x='{}' y='16' font-size='13' font-weight='bold'>{}</text>",
      L + cw * double(cols) + 150, T + ch * double(E) + 24, L, escape(title));
  for (size_t e = 0; e < E; ++e) {
    svg += fmt::format("<text x='{}' y='{}' text-anchor='end'>expert {}</text>", L - 4,
                       T + ch * double(e) + 11, e);
    for (size_t c = 0; c < cols; ++c) {
      const size_t a = c * n / cols, b = std::max(a + 1, (c + 1) * n / cols);
      double share = 0;
      for (size_t s = a; s < b; ++s) share += h.steps[s].load[layer][e];
      const double ratio = share / double(b - a) * double(E);  // 1: balanced
      // Blue below balance, white at it, red above (saturating at 0 and 2).
      const double t = std::clamp(ratio - 1.0, -1.0, 1.0);
      const int r = t < 0 ? int(255 * (1 + t)) : 255, g = int(255 * (1 - std::abs(t))),
                bl = t > 0 ? int(255 * (1 - t)) : 255;
      svg += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='rgb({},{},{})'/>",
                         L + cw * double(c), T + ch * double(e), cw, ch - 1, r, g, bl);
    }
  }
  svg += fmt::format("<text x='{}' y='{}'>step 1 .. {}; blue: below 1/E, red: above (2/E+)</text>",
                     L, T + ch * double(E) + 16, h.steps.back().step);
  return svg + "</svg>";
}

}  // namespace

std::string render_report(const RunConfig& cfg, const TrainHistory& h) {
  Series train{"train loss", "#1f77b4", {}}, val{"val loss", "#d62728", {}};
  for (const auto& s : h.steps) train.points.emplace_back(double(s.step), s.loss);
  for (const auto& e : h.evals) val.points.emplace_back(double(e.step), e.val_loss);
  std::string html = fmt::format(
      "<!doctype html><html><head><meta charset='utf-8'><title>Switchyard: {}</title>"
      "<style>body{{font-family:sans-serif;margin:24px;max-width:960px}}"
      "td,th{{padding:2px 10px;text-align:right}}pre{{background:#f6f6f6;padding:8px}}</style>"
      "</head><body><h1>Training report: {}</h1>",
      escape(cfg.name), escape(cfg.name));
  const LmConfig& m = cfg.model;
  html += fmt::format(
      "<p>{} layers, d_model {}, {} heads, context {}; {} MoE layers; {:.2f} M parameters, "
      "{:.2f} M active per token.</p>",
      m.n_layers, m.d_model, m.n_heads, m.context, m.n_moe_layers(), double(m.total_params()) / 1e6,
      double(m.active_params()) / 1e6);
  if (!h.steps.empty()) {
    const auto& last = h.steps.back();
    double tps = 0;
    for (const auto& s : h.steps) tps += s.tokens_per_s;
    html += fmt::format("<p>{} steps; last train loss {:.4f}; ", last.step, last.loss);
    if (!h.evals.empty())
      html += fmt::format("last val loss {:.4f} ({:.3f} bits per byte); ", h.evals.back().val_loss,
                          h.evals.back().val_loss / std::log(2.0));
    html += fmt::format("mean {:.0f} tokens/s.</p>", tps / double(h.steps.size()));
  }
  html += line_plot("Loss", "cross-entropy (nats)", {train, val});
  const size_t n_moe = h.steps.empty() ? 0 : h.steps[0].load.size();
  if (n_moe > 0) {
    static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                   "#8c564b", "#e377c2", "#7f7f7f"};
    std::vector<Series> peak, drop;
    for (size_t l = 0; l < n_moe; ++l) {
      Series p{fmt::format("MoE layer {}", l), colors[l % 8], {}}, d = p;
      for (const auto& s : h.steps) {
        double mx = 0;
        for (double v : s.load[l]) mx = std::max(mx, v);
        p.points.emplace_back(double(s.step), mx * double(s.load[l].size()));
        d.points.emplace_back(double(s.step), 100 * s.dropped[l]);
      }
      peak.push_back(std::move(p));
      drop.push_back(std::move(d));
    }
    html += "<h2>Expert load</h2>";
    html += line_plot("Busiest expert's load / mean load (1 = balanced)", "max / mean", peak);
    html += line_plot("Dropped slots (over capacity)", "% of slots", drop);
    for (size_t l = 0; l < n_moe; ++l)
      html += "<div>" + load_heatmap(fmt::format("MoE layer {}: load per expert", l), h, l) + "</div>";
  }
  html += "<h2>Config</h2><pre>" + escape(run_config_json(cfg)) + "</pre></body></html>\n";
  return html;
}

std::string render_loss_svg(const std::vector<std::string>& names,
                            const std::vector<const TrainHistory*>& histories,
                            const std::string& title) {
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                 "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  std::vector<Series> val;
  for (size_t i = 0; i < names.size(); ++i) {
    Series s{names[i], colors[i % 8], {}};
    for (const auto& e : histories[i]->evals) s.points.emplace_back(double(e.step), e.val_loss);
    val.push_back(std::move(s));
  }
  return line_plot(title, "cross-entropy (nats)", val);
}

std::string render_comparison(const std::vector<std::string>& names,
                              const std::vector<const TrainHistory*>& histories,
                              const std::string& caption) {
  return "<!doctype html><html><head><meta charset='utf-8'><title>Switchyard comparison</title>"
         "</head><body style='font-family:sans-serif'><h1>Validation loss</h1>" +
         render_loss_svg(names, histories, "Validation loss") + "<p>" + escape(caption) +
         "</p></body></html>\n";
}

}  // namespace sy
