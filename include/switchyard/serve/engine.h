// The serving engine: continuous batching of completions over one language model.
//
//   Engine engine(config, params, options);          // a Switchyard byte-level model, or
//   Engine engine(serve_hf_model(load_hf_model(dir), options), options);  // a Hugging Face one
//   std::shared_ptr<Completion> c = engine.submit(request);   // any thread
//   for (Completion::Update u; !(u = c->next()).done;) send(u.text);
//
// One scheduler thread runs every step: all running sequences go through the model together
// (ServedModel::step: LanguageModel::decode_batch or DecoderModel::forward_batch), so each MoE
// layer sees every sequence's rows at once and reads each expert's weights once per step. A step
// takes one token of each decoding sequence and then prompt chunks of at most `prefill_chunk`
// tokens while `step_tokens` allows, so a long prompt is fed over several steps without stalling
// the decodes. New requests join between steps while the batch and the KV budget allow; the rest
// wait in a bounded queue, and past that submit() refuses (Overloaded). A sequence leaves the step
// it finishes, is cancelled or passes its deadline.
//
// Each sampled token adds the bytes its tokenizer gives it (a byte model: the byte itself); text
// goes out as UTF-8, an incomplete character held until its last byte, a byte that cannot start
// or continue one replaced by U+FFFD. Stop strings end a completion before them; text that may
// be the start of a stop string is held until it is known not to be; a model's end-of-text
// token ends it too (finish "stop").
//
// The MoE layers run dropless here whatever the training config's eval capacity, so that a
// sequence's tokens do not depend on what it was batched with: with the same seed, a request
// gets the tokens it would get alone (tests/serve/engine_test.cpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "switchyard/core/error.h"
#include "switchyard/core/exec_context.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/nn/model.h"
#include "switchyard/serve/sampling.h"

namespace sy {

// The engine is full: the queue holds max_waiting requests. Retry later (HTTP 429).
class Overloaded : public Error {
 public:
  using Error::Error;
};

struct EngineOptions {
  int64_t max_batch = 32;      // sequences running (decoding or prefilling) together
  int64_t max_waiting = 256;   // requests queued beyond them; more are refused
  int64_t prefill_chunk = 64;  // prompt tokens one sequence feeds per step
  int64_t step_tokens = 256;   // rows per step, decodes and prefill chunks together
  int64_t kv_positions = 0;    // KV cache budget in positions, all sequences; 0: batch x context
  int n_threads = 0;           // 0: OpenMP's default
  const Backend* backend = nullptr;  // the GEMM kernels; nullptr: the f32 ones for this CPU
};

// One sequence's decoding state inside a ServedModel (its KV cache).
struct SequenceState {
  virtual ~SequenceState() = default;
  virtual int64_t n_pos() const = 0;  // positions filled
};

// What the engine runs: one model family behind a batch step, with its text side.
class ServedModel {
 public:
  struct Shape {
    int64_t vocab = 0, context = 0, n_moe_layers = 0, n_experts = 0, top_k = 0;
  };
  virtual ~ServedModel() = default;
  virtual Shape shape() const = 0;
  virtual std::unique_ptr<SequenceState> start() const = 0;
  // Sequence i feeds tokens[i] at its next positions; logits: [n_seq, vocab], each sequence's
  // last position; routing: per MoE layer, the step's stats and each row's first choice.
  virtual void step(std::span<const std::span<const int32_t>> tokens,
                    std::span<SequenceState* const> states, Tensor& logits,
                    DecodeRouting& routing) = 0;
  // The prompt's tokens (with the tokenizer's special tokens, such as BOS).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Turns one sequence's sampled tokens into bytes as they come: push(id) returns what can be
  // shown now, flush() the rest at the end. prompt: the sequence's prompt (a decoder may treat
  // a text's first token apart, such as SentencePiece's leading space).
  class Detokenizer {
   public:
    virtual ~Detokenizer() = default;
    virtual std::string push(int32_t id) = 0;
    virtual std::string flush() = 0;
  };
  virtual std::unique_ptr<Detokenizer> detokenizer(std::span<const int32_t> prompt) const = 0;
  virtual bool is_end(int32_t id) const = 0;  // an end-of-text token
};

// A Switchyard byte-level model (token = byte, vocab 256), dropless; on a bf16 backend its
// experts are read as bf16 (bf16_expert_params). Throws ConfigError for another vocabulary.
std::unique_ptr<ServedModel> serve_byte_model(const LmConfig& cfg, const LmParams& params,
                                              const EngineOptions& options);
// A Hugging Face model directory's model (load_hf_model) with its tokenizer.json; its MoE layers
// are dropless as transformers' are. Throws ConfigError without a tokenizer.
std::unique_ptr<ServedModel> serve_hf_model(HfModel model, const EngineOptions& options);

struct CompletionRequest {
  std::vector<int32_t> prompt;  // at least one token, at most the model's context
  int64_t max_tokens = 16;      // >= 1
  Sampling sampling;
  uint64_t seed = 0;              // the sampling stream (sampling_stream)
  std::vector<std::string> stop;  // up to 4 non-empty strings
  double deadline = 0;            // wall_seconds() after which it ends; 0: none
};

// Bytes in, UTF-8 text out, as the engine sends it: complete characters only (an incomplete
// one held until its last byte), U+FFFD for a byte that cannot start or continue one, cut
// before the first stop string, holding back text that may be the start of one.
class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stops = {}) : stops_(std::move(stops)) {}
  // The text this byte lets go out now; after a stop string, stopped() and nothing more.
  std::string push(unsigned char byte);
  // The same for a token's bytes, one after another.
  std::string push(std::string_view bytes);
  // At the end (not stopped): everything held, an incomplete character as U+FFFD.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string bytes_;  // an incomplete character
  std::string held_;   // characters that may begin a stop string
  bool stopped_ = false;
};

enum class Finish { kNone, kLength, kStop, kCancelled, kDeadline, kShutdown };
const char* finish_name(Finish f);  // "length", "stop", ... as the API reports them

// One request's progress, written by the scheduler and read by the request's thread.
class Completion {
 public:
  struct Update {
    std::string text;                           // new text since the last update
    std::vector<int32_t> tokens;                // the tokens sampled since then
    std::vector<std::vector<int32_t>> experts;  // [token][MoE layer]: its first-choice expert
    bool done = false;
    Finish finish = Finish::kNone;
  };
  // Blocks until there is something new or the completion ended; a timeout > 0 returns an
  // empty update after that many seconds (so a caller can check its client).
  Update next(double timeout_s = 0);
  void cancel();  // the scheduler drops it at the next step

  int64_t prompt_tokens() const { return prompt_tokens_; }
  int64_t completion_tokens() const;
  double submitted_at() const { return submitted_; }
  double first_token_at() const;  // 0 until the first token

 private:
  friend class Engine;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  Update pending_;
  int64_t made_ = 0;
  double submitted_ = 0, first_token_ = 0;
  int64_t prompt_tokens_ = 0;
  std::atomic<bool> cancelled_{false};
};

// Counters since start, for /metrics. Histograms are cumulative bucket counts.
struct EngineMetrics {
  int64_t running = 0, waiting = 0;
  int64_t kv_used = 0, kv_capacity = 0;  // positions
  int64_t requests_finished = 0, requests_refused = 0;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t steps = 0, step_rows = 0, step_sequences = 0;
  // Steps with no prompt rows (decode only) and their model time: the decode step's cost.
  int64_t decode_steps = 0;
  double decode_step_seconds = 0;
  std::vector<int64_t> finished_by_reason;  // indexed by Finish
  // batch size per step: counts of steps by decode batch, le bounds kBatchBuckets
  std::vector<int64_t> batch_hist;
  std::vector<int64_t> ttft_hist, itl_hist;  // le bounds kLatencyBuckets (seconds)
  double ttft_sum = 0, itl_sum = 0;
  int64_t ttft_count = 0, itl_count = 0;
  double experts_touched_sum = 0;  // per step, mean over MoE layers: distinct experts chosen
  // [MoE layer][expert]: slots routed there and slots dropped (dropless: 0).
  std::vector<std::vector<int64_t>> routed, dropped;
};
inline constexpr double kLatencyBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                             0.25,  0.5,    1,     2.5,  5,     10};
inline constexpr int64_t kBatchBuckets[] = {1, 2, 4, 8, 16, 32, 64, 128};

// For a process that decodes step after step (serve, its benchmarks): glibc keeps freed memory
// for reuse instead of returning it to the kernel. Each step allocates and frees its scratch
// (tens of MiB at batch 32); with glibc's default trim threshold the top of the heap goes back
// to the kernel and every step faults it in again, zeroed: about a tenth of a batched step on
// the machines here. Process-wide; call once at start.
void keep_freed_memory_for_reuse();

class Engine {
 public:
  // The model's config is used dropless (see above). Throws ConfigError for bad options.
  Engine(const LmConfig& cfg, const LmParams& params, const EngineOptions& options);
  Engine(std::unique_ptr<ServedModel> model, const EngineOptions& options);
  ~Engine();  // shutdown(), then joins the scheduler
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Throws ConfigError naming the field for a bad request, Overloaded when the queue is full,
  // Error after shutdown().
  std::shared_ptr<Completion> submit(CompletionRequest request);
  // Stops accepting; running and waiting completions end with Finish::kShutdown at the next
  // step boundary. Returns at once; the destructor waits for the scheduler.
  void shutdown();
  EngineMetrics metrics() const;
  ServedModel::Shape shape() const { return shape_; }
  const ServedModel& model() const { return *model_; }
  const EngineOptions& options() const { return opt_; }

 private:
  struct Sequence;
  void loop();
  void step(std::vector<std::unique_ptr<Sequence>>& running);
  void finish(Sequence& s, Finish why);

  std::unique_ptr<ServedModel> model_;
  ServedModel::Shape shape_;
  EngineOptions opt_;

  mutable std::mutex mutex_;  // guards waiting_, metrics_, stopping_, kv_used_
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  EngineMetrics metrics_;
  bool stopping_ = false;
  int64_t running_count_ = 0;
  std::thread thread_;
};

}  // namespace sy
