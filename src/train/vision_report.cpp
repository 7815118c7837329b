// What a vision model's experts receive: text and HTML (heatmaps, example images per expert).
#include <algorithm>
#include <cmath>

#include "switchyard/train/routes.h"
#include "switchyard/train/vision.h"

namespace sy {

namespace {

// [class][expert] counts of one layer, as the joint table the NMI takes.
std::vector<std::vector<double>> class_by_expert(const std::vector<int64_t>& expert_class,
                                                 int64_t E, int64_t K) {
  std::vector<std::vector<double>> joint(size_t(K), std::vector<double>(size_t(E), 0.0));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < K; ++c) joint[c][e] = double(expert_class[size_t(e * K + c)]);
  return joint;
}

}  // namespace

std::string render_vision_routes_text(const VisionRunConfig& cfg, const VisionEval& ev) {
  const int64_t K = cfg.model.n_classes, E = cfg.model.moe.n_experts;
  const char* unit = cfg.model.routing == VitRouting::kPerImage ? "images" : "patches";
  std::string out;
  for (size_t m = 0; m < ev.expert_class.size(); ++m) {
    const auto joint = class_by_expert(ev.expert_class[m], E, K);
    double total = 0;
    for (const auto& row : joint)
      for (double v : row) total += v;
    out += fmt::format("MoE layer {}: first-choice {}; NMI(class; expert) {:.3f}, share of the "
                       "class entropy the expert explains {:.3f}\n",
                       m, unit, normalized_mutual_information(joint),
                       label_entropy_explained(joint));
    out += "  expert  share   classes it gets most (share of its " + std::string(unit) + ")\n";
    for (int64_t e = 0; e < E; ++e) {
      double col = 0;
      for (int64_t c = 0; c < K; ++c) col += joint[c][e];
      std::vector<int64_t> order(static_cast<size_t>(K));
      for (int64_t c = 0; c < K; ++c) order[c] = c;
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return joint[a][e] > joint[b][e]; });
      std::string top;
      for (int64_t i = 0; i < std::min<int64_t>(3, K); ++i)
        if (joint[order[i]][e] > 0)
          top += fmt::format("  {} {:.0f}%", image_class_name(order[i], K), 100 * joint[order[i]][e] / col);
      out += fmt::format("  {:>6} {:5.1f}% {}\n", e, total > 0 ? 100 * col / total : 0.0, top);
    }
    out += "  class         experts that get it (share of the class)\n";
    for (int64_t c = 0; c < K; ++c) {
      double row = 0;
      for (double v : joint[c]) row += v;
      std::string mix;
      for (int64_t e = 0; e < E; ++e)
        if (row > 0 && joint[c][e] / row >= 0.05) mix += fmt::format("  e{} {:.0f}%", e, 100 * joint[c][e] / row);
      out += fmt::format("  {:<12}{}\n", image_class_name(c, K), mix);
    }
  }
  return out;
}

std::string render_vision_routes_html(const VisionRunConfig& cfg, const VisionEval& ev,
                                      const ImageSet& set, const std::string& title) {
  const int64_t K = cfg.model.n_classes, E = cfg.model.moe.n_experts;
  std::string html = fmt::format(
      "<!doctype html><html><head><meta charset=\"utf-8\"><title>routes: {0}</title><style>"
      "body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} "
      "td,th{{padding:3px 6px;text-align:right;font-size:12px}} img{{image-rendering:pixelated;"
      "margin:1px}}</style></head><body><h1>Routes of {0}</h1><p>{1} validation images; accuracy "
      "{2:.2f}%. Routing {3}; each cell: the share of the class's first choices that go to the "
      "expert.</p>",
      escape_html(title), ev.confusion.total(), 100 * ev.confusion.accuracy(),
      cfg.model.routing == VitRouting::kPerImage ? "per image" : "per patch");
  for (size_t m = 0; m < ev.expert_class.size(); ++m) {
    const auto joint = class_by_expert(ev.expert_class[m], E, K);
    html += fmt::format("<h2>MoE layer {}</h2><p>NMI(class; expert) {:.3f}</p><table><tr><th></th>",
                        m, normalized_mutual_information(joint));
    for (int64_t e = 0; e < E; ++e) html += fmt::format("<th>e{}</th>", e);
    html += "</tr>";
    for (int64_t c = 0; c < K; ++c) {
      double row = 0;
      for (double v : joint[c]) row += v;
      html += fmt::format("<tr><th style=\"text-align:left\">{}</th>", escape_html(image_class_name(c, K)));
      for (int64_t e = 0; e < E; ++e) {
        const double share = row > 0 ? joint[c][e] / row : 0.0;
        const int shade = int(std::lround(255 * (1 - share)));
        html += fmt::format("<td style=\"background:rgb({0},{0},255);color:{2}\">{1:.0f}%</td>", shade,
                            100 * share, share > 0.5 ? "white" : "black");
      }
      html += "</tr>";
    }
    html += "</table><h3>Example images per expert</h3><table>";
    // The first 16 images of the set that each expert gets (as the first choice of the image,
    // or of most of its patches), scaled up 2x.
    for (int64_t e = 0; e < E; ++e) {
      html += fmt::format("<tr><th>e{}</th><td style=\"text-align:left\">", e);
      int64_t shown = 0;
      for (size_t i = 0; i < ev.image_expert[m].size() && shown < 16; ++i) {
        if (ev.image_expert[m][i] != e) continue;
        const std::span<const uint8_t> img = set.image(int64_t(i));
        std::vector<uint8_t> rgb;
        for (uint8_t v : img) rgb.insert(rgb.end(), {v, v, v});
        html += fmt::format("<img width=\"{}\" height=\"{}\" title=\"{}\" src=\"{}\">",
                            2 * set.cols, 2 * set.rows, escape_html(image_class_name(set.labels[i], K)),
                            png_data_uri(uint32_t(set.cols), uint32_t(set.rows), rgb));
        ++shown;
      }
      html += "</td></tr>";
    }
    html += "</table>";
  }
  html += "</body></html>\n";
  return html;
}

}  // namespace sy
