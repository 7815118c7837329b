// Super-classes for Mobile V-MoE's guided per-image routing: classes that a trained dense model
// confuses with one another are grouped, and each group becomes one expert's share of the
// images (Daxberger et al. 2023: confusion matrix of a baseline, then graph clustering).
//
// The graph: a node per class, the edge between classes a and b weighted by how often the model
// takes one for the other, as rates: w(a, b) = C[a][b] / n_a + C[b][a] / n_b (C the confusion
// counts, n_a the images of class a). The clustering: the balanced partition into E groups
// (sizes differing by at most one, since each group is an expert's load) of largest weight
// inside the groups, i.e. the balanced minimum cut. Exact, by enumerating the balanced
// partitions, when there are at most 2 million of them (10 classes into 2..5 groups: at most
// 945); otherwise a Kernighan-Lin descent (best pairwise swap between groups until none helps)
// from several deterministic starts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/train/vision.h"

namespace sy {

struct SuperClasses {
  std::vector<int32_t> of_class;  // [n_classes]: the super-class (expert) of each class
  double inside = 0;              // total edge weight inside the groups
  double total = 0;               // total edge weight
  bool exact = false;             // found by enumeration (optimal) or by local search
};

// confusion: the counts of a model's predictions. Throws ConfigError unless 1 <= groups <= n.
SuperClasses cluster_classes(const ConfusionMatrix& confusion, int64_t groups);

// The super-class file train reads (data.superclasses): {"superclass": [...], "groups": [[class
// names]...], "inside_fraction", "method", "confusion"}.
std::string superclasses_json(const SuperClasses& s, const ConfusionMatrix& confusion,
                              const std::vector<std::string>& class_names);
// The confusion matrix as an SVG heatmap, classes ordered by super-class, each super-class's
// block outlined.
std::string superclasses_svg(const SuperClasses& s, const ConfusionMatrix& confusion,
                             const std::vector<std::string>& class_names);

}  // namespace sy
