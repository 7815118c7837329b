// Balanced clustering of a confusion graph into super-classes, and its JSON and SVG.
#include "switchyard/train/superclass.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"

namespace sy {

namespace {

// w(a, b) = C[a][b] / n_a + C[b][a] / n_b, zero on the diagonal.
std::vector<double> confusion_graph(const ConfusionMatrix& cm) {
  const int64_t n = cm.n_classes;
  std::vector<double> rows(size_t(n), 0.0), w(size_t(n * n), 0.0);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) rows[a] += double(cm.at(a, b));
  auto rate = [&](int64_t a, int64_t b) { return rows[a] > 0 ? double(cm.at(a, b)) / rows[a] : 0.0; };
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b)
      if (a != b) w[a * n + b] = rate(a, b) + rate(b, a);
  return w;
}

double inside_weight(const std::vector<double>& w, const std::vector<int32_t>& of, int64_t n) {
  double s = 0;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a + 1; b < n; ++b)
      if (of[a] == of[b]) s += w[a * n + b];
  return s;
}

// Exact search over balanced partitions: items in order, each into an open group with room or
// the next unopened one (groups are unlabelled, so this visits each partition once). Returns
// false when the leaf budget runs out.
struct Enumerator {
  const std::vector<double>& w;
  int64_t n, groups, small, n_large;  // sizes: n_large groups of small + 1, the rest of small
  int64_t budget;
  std::vector<int32_t> of, best;
  std::vector<int64_t> size;
  double best_inside = -1;
  int64_t leaves = 0;

  bool run(int64_t i, int64_t opened, int64_t large_used, double inside) {
    if (i == n) {
      if (++leaves > budget) return false;
      if (opened == groups && inside > best_inside) best_inside = inside, best = of;
      return true;
    }
    // Groups still to open need at least `small` items each.
    if (n - i < (groups - opened) * small) return true;
    for (int64_t g = 0; g <= std::min(opened, groups - 1); ++g) {
      // A group takes up to `small` items, and one more while fewer than n_large are large.
      if (size[g] + 1 > small + 1 || (size[g] + 1 > small && large_used >= n_large)) continue;
      double add = 0;
      for (int64_t j = 0; j < i; ++j)
        if (of[j] == g) add += w[i * n + j];
      of[i] = int32_t(g);
      ++size[g];
      const bool grew_large = size[g] == small + 1;
      const bool ok = run(i + 1, std::max(opened, g + 1), large_used + grew_large, inside + add);
      --size[g];
      of[i] = -1;
      if (!ok) return false;
    }
    return true;
  }
};

// Kernighan-Lin descent: the best swap of two items in different groups, while one improves.
void swap_descent(const std::vector<double>& w, int64_t n, std::vector<int32_t>& of) {
  // gain of moving a to group g: its weight to g minus its weight to its own group.
  auto weight_to = [&](int64_t a, int32_t g) {
    double s = 0;
    for (int64_t b = 0; b < n; ++b)
      if (b != a && of[b] == g) s += w[a * n + b];
    return s;
  };
  while (true) {
    double best = 1e-12;
    int64_t ba = -1, bb = -1;
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = a + 1; b < n; ++b) {
        if (of[a] == of[b]) continue;
        const double gain = weight_to(a, of[b]) - weight_to(a, of[a]) + weight_to(b, of[a]) -
                            weight_to(b, of[b]) - 2 * w[a * n + b];
        if (gain > best) best = gain, ba = a, bb = b;
      }
    if (ba < 0) return;
    std::swap(of[ba], of[bb]);
  }
}

}  // namespace

SuperClasses cluster_classes(const ConfusionMatrix& cm, int64_t groups) {
  const int64_t n = cm.n_classes;
  if (groups < 1 || groups > n)
    throw ConfigError(fmt::format("{} super-classes of {} classes: expected 1..{}", groups, n, n));
  const std::vector<double> w = confusion_graph(cm);
  SuperClasses out;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = a + 1; b < n; ++b) out.total += w[a * n + b];
  Enumerator en{w, n, groups, n / groups, n % groups, /*budget=*/2'000'000,
                std::vector<int32_t>(size_t(n), -1), {}, std::vector<int64_t>(size_t(groups), 0)};
  if (en.run(0, 0, 0, 0.0) && !en.best.empty()) {
    out.of_class = en.best;
    out.exact = true;
  } else {
    double best = -1;
    for (uint64_t start = 0; start < 16; ++start) {
      std::vector<int64_t> perm(static_cast<size_t>(n));
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t i = n - 1; i > 0 && start > 0; --i)
        std::swap(perm[i], perm[Philox(start, 0x5C).bits(uint64_t(i))[0] % uint32_t(i + 1)]);
      std::vector<int32_t> of(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) of[perm[i]] = int32_t(i % groups);
      swap_descent(w, n, of);
      if (const double s = inside_weight(w, of, n); s > best) best = s, out.of_class = of;
    }
  }
  out.inside = inside_weight(w, out.of_class, n);
  return out;
}

std::string superclasses_json(const SuperClasses& s, const ConfusionMatrix& cm,
                              const std::vector<std::string>& names) {
  nlohmann::ordered_json j;
  j["superclass"] = s.of_class;
  const int64_t groups = *std::max_element(s.of_class.begin(), s.of_class.end()) + 1;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (int64_t g = 0; g < groups; ++g) {
    nlohmann::ordered_json members = nlohmann::ordered_json::array();
    for (size_t c = 0; c < s.of_class.size(); ++c)
      if (s.of_class[c] == g) members.push_back(names[c]);
    list.push_back(members);
  }
  j["groups"] = list;
  j["inside_fraction"] = s.total > 0 ? s.inside / s.total : 0.0;
  j["method"] = s.exact ? "balanced minimum cut, exact (all balanced partitions enumerated)"
                        : "balanced minimum cut, Kernighan-Lin swap descent from 16 starts";
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (int64_t a = 0; a < cm.n_classes; ++a) {
    std::vector<int64_t> r;
    for (int64_t b = 0; b < cm.n_classes; ++b) r.push_back(cm.at(a, b));
    rows.push_back(r);
  }
  j["confusion"] = rows;
  return j.dump(2) + "\n";
}

std::string superclasses_svg(const SuperClasses& s, const ConfusionMatrix& cm,
                             const std::vector<std::string>& names) {
  const int64_t n = cm.n_classes, cell = 34, left = 110, top = 110;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return s.of_class[a] < s.of_class[b]; });
  std::vector<double> rows(static_cast<size_t>(n), 0.0);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) rows[a] += double(cm.at(a, b));
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"11\">\n",
      std::max<int64_t>(left + n * cell + 20, 680), top + n * cell + 40);
  svg += fmt::format("<text x=\"{}\" y=\"16\" font-size=\"13\">Confusion (rows: true class, "
                     "columns: predicted; off-diagonal rates, square root scale), super-classes "
                     "outlined</text>\n",
                     10);
  for (int64_t i = 0; i < n; ++i) {
    const std::string& name = names[order[i]];
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", left - 6,
                       top + i * cell + cell / 2 + 4, name);
    svg += fmt::format("<text transform=\"translate({},{}) rotate(-60)\">{}</text>\n",
                       left + i * cell + cell / 2, top - 6, name);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t a = order[i], b = order[j];
      const double rate = rows[a] > 0 ? double(cm.at(a, b)) / rows[a] : 0.0;
      // Off-diagonal rates are small next to the diagonal: a square-root scale capped at 0.25
      // shows them; the diagonal is drawn grey.
      const double v = a == b ? 0.0 : std::min(1.0, std::sqrt(rate / 0.25));
      const int shade = int(std::lround(255 * (1 - v)));
      const std::string fill = a == b ? "#bbbbbb" : fmt::format("rgb(255,{},{})", shade, shade);
      svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"/>\n",
                         left + j * cell, top + i * cell, cell, cell, fill);
      svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text>\n",
                         left + j * cell + cell / 2, top + i * cell + cell / 2 + 3, cm.at(a, b));
    }
  for (int64_t i = 0; i < n;) {
    int64_t j = i;
    while (j < n && s.of_class[order[j]] == s.of_class[order[i]]) ++j;
    svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" "
                       "stroke=\"#0044cc\" stroke-width=\"3\"/>\n",
                       left + i * cell, top + i * cell, (j - i) * cell, (j - i) * cell);
    i = j;
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace sy
