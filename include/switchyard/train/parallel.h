// What expert and data parallelism need beyond the layer (core/parallel.h): a model's experts
// split into per-rank shards and gathered back, and the gradient all-reduce.
//
// Every rank of an expert group holds the same LmParams except w1, w3 and w2 of MoE layers,
// where it keeps its block of E / P experts. Checkpoints always hold the whole model, so a
// checkpoint from a run on any number of ranks loads into any other (resharding on load).
#pragma once

#include <string_view>

#include "switchyard/core/parallel.h"
#include "switchyard/nn/model.h"

namespace sy {

// Whether a checkpoint name ("layers.0.moe.w1") is an expert weight, split over ep ranks.
bool is_expert_weight(std::string_view name);

// Experts [rank E/P, (rank+1) E/P) of a stacked [E, ...] tensor.
Tensor expert_shard(const Tensor& full, int64_t ep_rank, int64_t ep_size);

// Replaces every expert weight of p by this rank's shard.
void shard_experts(LmParams& p, const ParallelGroup& g);
// The whole model from every rank's shard; collective over the expert group.
LmParams gather_experts(const LmParams& p, const ParallelGroup& g);

// Sums every gradient over the ranks that hold a copy of its parameter (expert weights over the
// replicas, everything else over the world) and divides by the world size: each rank's g is of
// its own tokens' mean loss, so the result is the gradient of the mean over all of them.
void allreduce_gradients(LmParams& g, const ParallelGroup& grid);

// --overlap: "on", "off", or "auto" (on where the expert group spans hosts: overlapping pays
// over a network, not in shared memory; bench/README.md). Throws ConfigError for another word.
bool overlap_exchange(std::string_view mode, const ParallelGroup& grid);

}  // namespace sy
