// Routing analytics of a trained model on text: for every MoE layer and expert, the load, the
// dropped fraction, the router's entropy, how often experts are chosen together, and what each
// expert specialises in (the bytes and words routed to it more than to the average expert).
// Specialisation by label: how the tokens of each character class (every corpus) and of each
// language and script (a labelled corpus) spread over the experts, and the normalised mutual
// information between the label and the expert chosen.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "switchyard/io/tokenizer.h"
#include "switchyard/nn/decoder.h"
#include "switchyard/nn/model.h"
#include "switchyard/train/data.h"

namespace sy {

struct ExpertProfile {
  int64_t slots = 0;          // slots that chose this expert
  int64_t kept = 0;           // of them, computed (not dropped)
  std::vector<std::pair<int, double>> top_bytes;          // byte, lift (share / average share)
  std::vector<std::pair<std::string, double>> top_words;  // word, lift
};

// Routed slots by a label of the token: one (label, expert) pair per slot a token chose (top-k
// gives k); slots of expert choice count only where the expert took the token.
struct LabelRoutes {
  std::string kind;                        // "character class", "language", "script"
  std::vector<std::string> names;          // one per label
  std::vector<int32_t> group;              // languages: the index of each one's script; else empty
  std::vector<std::vector<double>> slots;  // [labels][E]
  double nmi = 0;                          // normalized_mutual_information(slots)
  double explained = 0;                    // label_entropy_explained(slots)
  // The same with the labels shuffled over the tokens: what a finite sample gives with no
  // specialisation at all (large when labels are many and tokens per label few).
  double nmi_chance = 0;
};

struct LayerRoutes {
  int64_t layer = 0;  // index in the model
  std::vector<ExpertProfile> experts;
  std::vector<std::vector<int64_t>> co_selected;  // [E][E]: tokens that chose both
  double entropy = 0;           // mean router entropy, nats
  double dropped_fraction = 0;  // dropped slots / all slots
  double load_cv = 0;           // coefficient of variation of slots per expert
  std::vector<LabelRoutes> labels;  // character class; then language and script if labelled
};

struct RouteAnalysis {
  int64_t n_tokens = 0;  // padding of labelled validation batches excluded
  std::vector<std::string> scripts;  // labelled corpus: the script names LabelRoutes::group indexes
  std::vector<LayerRoutes> layers;
};

// Runs the model (eval mode) over the batches and gathers the statistics. With a labelled
// corpus (whose val_batches these are), also by language and script.
RouteAnalysis analyze_routes(const LanguageModel& model, const LmParams& p,
                             const std::vector<Batch>& batches, const ExecContext& ctx,
                             const Corpus* corpus = nullptr);

// The same for a published decoder (io/hf_model.h) on token ids its tokenizer made, in windows of
// `window` tokens: each token's "word" is its own text (trimmed, lower-cased) and its character
// class that of its first byte that is not a space. Its MoE layers run dropless, so nothing is
// dropped. Throws ConfigError for a dense model.
RouteAnalysis analyze_decoder_routes(const DecoderModel& model, const DecoderParams& p,
                                     const Tokenizer& tok, std::span<const int32_t> ids,
                                     int64_t window, const ExecContext& ctx);

std::string render_routes_text(const RouteAnalysis& a);
std::string render_routes_html(const RouteAnalysis& a, const std::string& title);

// An RGB image (rgb: [h, w, 3], row-major) as a PNG data: URI, for the HTML reports.
std::string png_data_uri(uint32_t w, uint32_t h, const std::vector<uint8_t>& rgb);

// Coefficient of variation (std / mean) of a load vector; 0 for a perfectly even one.
double load_cv(const std::vector<double>& load);

// Normalised mutual information of a joint count table [X][Y]: I(X;Y) / ((H(X) + H(Y)) / 2),
// the arithmetic-mean normalisation (scikit-learn's default). 1 when each X goes to Y values of
// its own alone and both are equally spread (perfect specialisation), 0 when X and Y are
// independent or either is constant.
double normalized_mutual_information(const std::vector<std::vector<double>>& joint);
// s with <, > and & escaped, for HTML text.
std::string escape_html(const std::string& s);

// I(X;Y) / H(X) of a joint count table [X][Y] (Theil's uncertainty coefficient): the share of
// the label's entropy that knowing the expert removes; 1 when the expert determines the label.
// Unlike NMI it is not held down by the experts' own entropy (top-k spreads a label over at
// least k experts, so perfect specialisation has NMI below 1).
double label_entropy_explained(const std::vector<std::vector<double>>& joint);

// The class of a byte that routes are reported by when a corpus carries no labels.
inline constexpr int kCharClasses = 8;
int char_class(int byte);
const char* char_class_name(int cls);

}  // namespace sy
