// Continuous batching: see engine.h.
#include "switchyard/serve/engine.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <utility>

namespace sy {

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::kNone:
      return "none";
    case Finish::kLength:
      return "length";
    case Finish::kStop:
      return "stop";
    case Finish::kCancelled:
      return "cancelled";
    case Finish::kDeadline:
      return "deadline";
    case Finish::kShutdown:
      return "shutdown";
  }
  return "?";
}

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Moves the complete UTF-8 characters at the front of `bytes` to `out`; an ill-formed sequence
// becomes one U+FFFD per maximal subpart (the replacement practice of Unicode's chapter 3, which
// Python's errors="replace" and browsers follow); an incomplete character stays in `bytes`.
void take_utf8(std::string& bytes, std::string& out) {
  size_t i = 0;
  while (i < bytes.size()) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
    if (b < 0x80)
      need = 1;
    else if (b >= 0xC2 && b <= 0xDF)
      need = 2;
    else if (b >= 0xE0 && b <= 0xEF)
      need = 3, lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
    else if (b >= 0xF0 && b <= 0xF4)
      need = 4, lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
    if (need == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    size_t j = 1;
    bool bad = false;
    for (; j < need && i + j < bytes.size(); ++j) {
      const auto c = static_cast<unsigned char>(bytes[i + j]);
      if (c < (j == 1 ? lo : 0x80) || c > (j == 1 ? hi : 0xBF)) {
        bad = true;
        break;
      }
    }
    if (bad) {  // the bytes so far (a maximal subpart, as Unicode recommends) become one U+FFFD
      out += kReplacement;
      i += j;
      continue;
    }
    if (j < need) break;  // incomplete: wait for the rest
    out.append(bytes, i, need);
    i += need;
  }
  bytes.erase(0, i);
}

// Length of the longest suffix of text that is a proper prefix of one of the stops.
size_t held_for_stops(const std::string& text, const std::vector<std::string>& stops) {
  size_t held = 0;
  for (const std::string& stop : stops)
    for (size_t n = std::min(text.size(), stop.size() - 1); n > held; --n)
      if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
        held = n;
        break;
      }
  return held;
}

}  // namespace

std::string TextStream::push(unsigned char byte) {
  if (stopped_) return {};
  bytes_.push_back(char(byte));
  take_utf8(bytes_, held_);
  size_t cut = std::string::npos;
  for (const std::string& stop : stops_) cut = std::min(cut, held_.find(stop));
  if (cut != std::string::npos) {
    held_.resize(cut);
    stopped_ = true;
    bytes_.clear();
    return std::exchange(held_, {});
  }
  const size_t send = held_.size() - held_for_stops(held_, stops_);
  std::string out = held_.substr(0, send);
  held_.erase(0, send);
  return out;
}

std::string TextStream::push(std::string_view bytes) {
  std::string out;
  for (char c : bytes) out += push(static_cast<unsigned char>(c));
  return out;
}

std::string TextStream::flush() {
  if (stopped_) return {};
  if (!bytes_.empty()) held_ += kReplacement;  // a character cut short
  bytes_.clear();
  return std::exchange(held_, {});
}

namespace {

void add_to_histogram(std::vector<int64_t>& hist, double value, std::span<const double> bounds) {
  hist.resize(bounds.size() + 1);
  size_t b = 0;
  while (b < bounds.size() && value > bounds[b]) ++b;
  ++hist[b];
}

}  // namespace

struct Engine::Sequence {
  CompletionRequest req;
  std::shared_ptr<Completion> out;
  std::unique_ptr<SequenceState> state;
  std::unique_ptr<ServedModel::Detokenizer> detok;
  Philox rng{0, 0};
  int64_t fed = 0;       // prompt tokens fed
  int64_t feeding = 0;   // of them, in the step being run
  int32_t last = -1;     // the last token sampled: fed at the next step
  int64_t made = 0;      // tokens sampled
  int64_t reserved = 0;  // KV positions it may fill
  double last_token_at = 0;
  TextStream text;
  bool admitted = false;  // running: counted in running_count_
  bool done = false;
};

Completion::Update Completion::next(double timeout_s) {
  std::unique_lock lock(mutex_);
  auto ready = [&] { return pending_.done || !pending_.tokens.empty() || !pending_.text.empty(); };
  if (timeout_s > 0)
    changed_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
  else
    changed_.wait(lock, ready);
  Update u;
  std::swap(u, pending_);
  pending_.done = u.done;
  pending_.finish = u.finish;
  return u;
}

void Completion::cancel() { cancelled_ = true; }

int64_t Completion::completion_tokens() const {
  std::lock_guard lock(mutex_);
  return made_;
}

double Completion::first_token_at() const {
  std::lock_guard lock(mutex_);
  return first_token_;
}

void keep_freed_memory_for_reuse() {
  // Fixed thresholds also stop glibc's dynamic mmap threshold from moving with the scratch.
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
}

namespace {

ExecContext eval_context(const EngineOptions& o) {
  ExecContext ctx;
  ctx.n_threads = o.n_threads;
  ctx.backend = o.backend;
  ctx.training = false;
  return ctx;
}

// The engine's states as a model's own: State holds it as s.
template <class State>
auto own_states(std::span<SequenceState* const> states) {
  std::vector<decltype(&static_cast<State*>(nullptr)->s)> out;
  for (SequenceState* st : states) out.push_back(&static_cast<State*>(st)->s);
  return out;
}

LmConfig dropless(LmConfig c) {
  c.moe.dropless = true;
  return c;
}

class ByteModel final : public ServedModel {
 public:
  struct State final : SequenceState {
    DecodeState s;
    int64_t n_pos() const override { return s.n_pos(); }
  };
  ByteModel(const LmConfig& cfg, const LmParams& params, const EngineOptions& o)
      : cfg_(dropless(cfg)),
        // On a bf16 backend the experts are read as bf16 (bf16_expert_params says why).
        bf16_params_(decodes_with_bf16_experts(o.backend) ? bf16_expert_params(params)
                                                          : LmParams{}),
        params_(decodes_with_bf16_experts(o.backend) ? bf16_params_ : params),
        model_(cfg_),
        ctx_(eval_context(o)) {
    if (cfg_.vocab != 256)
      throw ConfigError(
          fmt::format("serve: model.vocab = {}: expected 256 (a byte-level model)", cfg_.vocab));
    model_.check_params(params_, 1, /*for_decode=*/true);
  }
  Shape shape() const override {
    return {cfg_.vocab, cfg_.context, cfg_.n_moe_layers(), cfg_.moe.n_experts, cfg_.moe.top_k};
  }
  std::unique_ptr<SequenceState> start() const override {
    auto st = std::make_unique<State>();
    st->s = model_.start(DType::kF32);
    return st;
  }
  void step(std::span<const std::span<const int32_t>> tokens,
            std::span<SequenceState* const> states, Tensor& logits,
            DecodeRouting& routing) override {
    model_.decode_batch(params_, tokens, own_states<State>(states), logits, ctx_, &routing);
  }
  std::vector<int32_t> encode(std::string_view text) const override {
    return std::vector<int32_t>(reinterpret_cast<const unsigned char*>(text.data()),
                                reinterpret_cast<const unsigned char*>(text.data()) + text.size());
  }
  // Token = byte: each byte as it comes; TextStream makes UTF-8 of them.
  std::unique_ptr<Detokenizer> detokenizer(std::span<const int32_t>) const override {
    struct Bytes final : Detokenizer {
      std::string push(int32_t id) override { return std::string(1, char(id)); }
      std::string flush() override { return {}; }
    };
    return std::make_unique<Bytes>();
  }
  bool is_end(int32_t) const override { return false; }

 private:
  LmConfig cfg_;
  LmParams bf16_params_;    // on a bf16 backend: the caller's with bf16 experts
  const LmParams& params_;  // what decoding reads: the caller's, or bf16_params_
  LanguageModel model_;
  ExecContext ctx_;
};

// Text of a growing token list, shown as soon as it is stable: the decoding of the tokens since
// the last shown ones, with a few tokens before them as context (so that a decoder's
// start-of-text rules, such as a stripped leading space, fall on the context), less the
// decoding of that context; held while it ends in U+FFFD (a character whose bytes span
// tokens). The decoders replace incomplete UTF-8, so the shown text is always valid.
class Incremental final : public ServedModel::Detokenizer {
 public:
  Incremental(const Tokenizer& tok, std::span<const int32_t> prompt) : tok_(tok) {
    set_context(prompt);
  }
  std::string push(int32_t id) override {
    ids_.push_back(id);
    std::string out = delta();
    if (out.empty() || out.ends_with("\xef\xbf\xbd")) return {};
    const std::vector<int32_t> seen = std::move(ids_);
    set_context(seen);  // shown: its last tokens are the next context
    return out;
  }
  std::string flush() override {
    std::string out = delta();
    set_context({});
    return out;
  }

 private:
  static constexpr ptrdiff_t kContext = 4;
  // The last kContext tokens of `ids` become the context, decoded once here.
  void set_context(std::span<const int32_t> ids) {
    ids_.assign(ids.end() - std::min<ptrdiff_t>(ptrdiff_t(ids.size()), kContext), ids.end());
    shown_ = ids_.size();
    head_ = tok_.decode(ids_, /*skip_special_tokens=*/true);
  }
  // decode(ids_) less the context's decoding.
  std::string delta() const {
    const std::span<const int32_t> all(ids_);
    const std::string text = tok_.decode(all, /*skip_special_tokens=*/true);
    if (text.starts_with(head_)) return text.substr(head_.size());
    // A decoder that rewrote the context once more followed: the new tokens alone.
    return tok_.decode(all.subspan(shown_), /*skip_special_tokens=*/true);
  }
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;  // the context, then the tokens not shown yet
  size_t shown_ = 0;          // of ids_, the context
  std::string head_;          // the context's decoding
};

class HfServed final : public ServedModel {
 public:
  struct State final : SequenceState {
    DecoderState s;
    int64_t n_pos() const override { return s.n_pos; }
  };
  HfServed(HfModel m, const EngineOptions& o)
      : m_(std::move(m)), model_(m_.config), ctx_(eval_context(o)) {
    if (!m_.tokenizer)
      throw ConfigError(
          fmt::format("serve --model {}: no tokenizer.json: expected one to turn "
                      "prompts into tokens and tokens into text",
                      m_.dir));
    // As for byte models (bf16_expert_params): on a bf16 backend f32 routed experts are read
    // as bf16, rounded once here.
    if (decodes_with_bf16_experts(o.backend))
      for (DecoderLayerParams& l : m_.params.layers)
        for (Tensor* w : {&l.moe.w1, &l.moe.w3, &l.moe.w2})
          if (!w->empty() && w->dtype() == DType::kF32) *w = convert(*w, DType::kBF16);
    model_.check_params(m_.params);
  }
  Shape shape() const override {
    const DecoderConfig& c = m_.config;
    return {c.vocab, c.max_context, c.n_moe_layers(), c.moe.n_experts, c.moe.top_k};
  }
  std::unique_ptr<SequenceState> start() const override {
    auto st = std::make_unique<State>();
    st->s = model_.start();
    return st;
  }
  void step(std::span<const std::span<const int32_t>> tokens,
            std::span<SequenceState* const> states, Tensor& logits,
            DecodeRouting& routing) override {
    model_.forward_batch(m_.params, tokens, own_states<State>(states), logits, ctx_);
    routing.layers = model_.last_routing();
    routing.top1 = model_.last_top1();
  }
  std::vector<int32_t> encode(std::string_view text) const override {
    return m_.tokenizer->encode(text);
  }
  std::unique_ptr<Detokenizer> detokenizer(std::span<const int32_t> prompt) const override {
    return std::make_unique<Incremental>(*m_.tokenizer, prompt);
  }
  bool is_end(int32_t id) const override {
    return std::find(m_.eos_ids.begin(), m_.eos_ids.end(), id) != m_.eos_ids.end();
  }

 private:
  HfModel m_;
  DecoderModel model_;
  ExecContext ctx_;
};

}  // namespace

std::unique_ptr<ServedModel> serve_byte_model(const LmConfig& cfg, const LmParams& params,
                                              const EngineOptions& options) {
  return std::make_unique<ByteModel>(cfg, params, options);
}

std::unique_ptr<ServedModel> serve_hf_model(HfModel model, const EngineOptions& options) {
  return std::make_unique<HfServed>(std::move(model), options);
}

Engine::Engine(const LmConfig& cfg, const LmParams& params, const EngineOptions& options)
    : Engine(serve_byte_model(cfg, params, options), options) {}

Engine::Engine(std::unique_ptr<ServedModel> model, const EngineOptions& options)
    : model_(std::move(model)), shape_(model_->shape()), opt_(options) {
  for (auto [name, v] :
       {std::pair{"max_batch", opt_.max_batch}, std::pair{"prefill_chunk", opt_.prefill_chunk},
        std::pair{"step_tokens", opt_.step_tokens}})
    if (v < 1) throw ConfigError(fmt::format("serve: {} = {}: expected >= 1", name, v));
  if (opt_.max_waiting < 0)
    throw ConfigError(fmt::format("serve: max_waiting = {}: expected >= 0", opt_.max_waiting));
  if (opt_.step_tokens < opt_.max_batch)
    throw ConfigError(
        fmt::format("serve: step_tokens = {} < max_batch = {}: every running "
                    "sequence needs a row per step",
                    opt_.step_tokens, opt_.max_batch));
  if (opt_.kv_positions == 0) opt_.kv_positions = opt_.max_batch * shape_.context;
  if (opt_.kv_positions < shape_.context)
    throw ConfigError(fmt::format("serve: kv_positions = {}: expected at least the context ({})",
                                  opt_.kv_positions, shape_.context));
  metrics_.kv_capacity = opt_.kv_positions;
  metrics_.finished_by_reason.assign(6, 0);
  metrics_.routed.assign(size_t(shape_.n_moe_layers),
                         std::vector<int64_t>(size_t(shape_.n_experts)));
  metrics_.dropped = metrics_.routed;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  shutdown();
  if (thread_.joinable()) thread_.join();
}

void Engine::shutdown() {
  std::lock_guard lock(mutex_);
  stopping_ = true;
  wake_.notify_all();
}

std::shared_ptr<Completion> Engine::submit(CompletionRequest r) {
  const int64_t n = int64_t(r.prompt.size());
  if (n == 0) throw ConfigError("prompt is empty: expected at least one token");
  if (n > shape_.context)
    throw ConfigError(
        fmt::format("prompt: {} tokens, the model's context is {}", n, shape_.context));
  for (int32_t t : r.prompt)
    if (t < 0 || t >= shape_.vocab)
      throw ConfigError(fmt::format("prompt: token {}: expected 0..{}", t, shape_.vocab - 1));
  if (r.max_tokens < 1)
    throw ConfigError(fmt::format("max_tokens {}: expected >= 1", r.max_tokens));
  check_sampling(r.sampling, FieldNames::kJson);
  if (r.stop.size() > 4)
    throw ConfigError(fmt::format("stop: {} strings, expected at most 4", r.stop.size()));
  for (const std::string& s : r.stop)
    if (s.empty()) throw ConfigError("stop: an empty string, expected non-empty ones");
  auto s = std::make_unique<Sequence>();
  // Positions it can fill: the prompt and every sampled token but the last, within the context.
  s->reserved = std::min(shape_.context, n + r.max_tokens - 1);
  s->detok = model_->detokenizer(r.prompt);
  s->rng = sampling_stream(r.seed);
  s->text = TextStream(r.stop);
  s->out = std::make_shared<Completion>();
  s->out->prompt_tokens_ = n;
  s->out->submitted_ = wall_seconds();
  s->req = std::move(r);
  std::shared_ptr<Completion> out = s->out;
  std::lock_guard lock(mutex_);
  if (stopping_) throw Error("serve: shutting down, no new requests");
  if (int64_t(waiting_.size()) >=
      opt_.max_waiting + std::max<int64_t>(0, opt_.max_batch - running_count_)) {
    ++metrics_.requests_refused;
    throw Overloaded(fmt::format("{} requests waiting (the limit) and {} running: retry later",
                                 waiting_.size(), running_count_));
  }
  waiting_.push_back(std::move(s));
  metrics_.waiting = int64_t(waiting_.size());
  wake_.notify_all();
  return out;
}

EngineMetrics Engine::metrics() const {
  std::lock_guard lock(mutex_);
  return metrics_;
}

void Engine::finish(Sequence& s, Finish why) {
  s.done = true;
  {
    // Its slot is free before its client hears of the end, so that the client's next
    // request finds it free.
    std::lock_guard lock(mutex_);
    ++metrics_.requests_finished;
    ++metrics_.finished_by_reason[size_t(why)];
    if (s.admitted) metrics_.running = --running_count_;
  }
  {
    const std::string rest = s.text.push(s.detok->flush());
    std::lock_guard lock(s.out->mutex_);
    s.out->pending_.text += rest + s.text.flush();
    s.out->pending_.done = true;
    s.out->pending_.finish = why;
  }
  s.out->changed_.notify_all();
}

void Engine::loop() {
  std::vector<std::unique_ptr<Sequence>> running;
  int64_t reserved = 0;
  for (;;) {
    std::vector<std::unique_ptr<Sequence>> ended;
    bool stopping = false;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !waiting_.empty() || !running.empty(); });
      stopping = stopping_;
      if (stopping_) {
        for (auto& s : waiting_) ended.push_back(std::move(s));
        waiting_.clear();
        for (auto& s : running) ended.push_back(std::move(s));
        running.clear();
      }
      while (!stopping_ && !waiting_.empty() && int64_t(running.size()) < opt_.max_batch &&
             reserved + waiting_.front()->reserved <= opt_.kv_positions) {
        reserved += waiting_.front()->reserved;
        waiting_.front()->state = model_->start();
        waiting_.front()->admitted = true;
        ++running_count_;
        running.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
      metrics_.waiting = int64_t(waiting_.size());
      metrics_.running = running_count_;
    }
    if (stopping) {
      for (auto& s : ended) finish(*s, Finish::kShutdown);
      return;
    }
    const double now = wall_seconds();
    for (auto& s : running) {
      if (s->out->cancelled_)
        finish(*s, Finish::kCancelled);
      else if (s->req.deadline > 0 && now > s->req.deadline)
        finish(*s, Finish::kDeadline);
    }
    auto drop_done = [&] {
      for (auto& s : running)
        if (s->done) reserved -= s->reserved;
      std::erase_if(running, [](const std::unique_ptr<Sequence>& s) { return s->done; });
    };
    drop_done();
    if (!running.empty()) step(running);
    drop_done();
    std::lock_guard lock(mutex_);
    int64_t filled = 0;
    for (auto& s : running) filled += s->state->n_pos();
    metrics_.kv_used = filled;
  }
}

void Engine::step(std::vector<std::unique_ptr<Sequence>>& running) {
  std::vector<std::span<const int32_t>> tokens;
  std::vector<SequenceState*> states;
  std::vector<Sequence*> in_step;
  int64_t budget = opt_.step_tokens;
  for (auto& s : running)  // decodes first: one row each
    if (s->fed == int64_t(s->req.prompt.size())) {
      tokens.emplace_back(&s->last, 1);
      states.push_back(s->state.get());
      in_step.push_back(s.get());
      --budget;
    }
  for (auto& s : running) {  // then prompt chunks while rows are left
    const int64_t left = int64_t(s->req.prompt.size()) - s->fed;
    if (left == 0 || budget == 0) continue;
    s->feeding = std::min({left, opt_.prefill_chunk, budget});
    tokens.push_back(
        std::span<const int32_t>(s->req.prompt).subspan(size_t(s->fed), size_t(s->feeding)));
    states.push_back(s->state.get());
    in_step.push_back(s.get());
    budget -= s->feeding;
  }
  Tensor logits;
  DecodeRouting routing;
  const double t0 = wall_seconds();
  model_->step(tokens, states, logits, routing);
  const double now = wall_seconds();

  // The counters first: a client told of its completion's end finds them up to date.
  {
    int64_t rows = 0, decoded = 0, prefilled = 0;
    std::vector<double> ttft, itl;
    for (size_t i = 0; i < in_step.size(); ++i) {
      const Sequence& s = *in_step[i];
      rows += int64_t(tokens[i].size());
      prefilled += s.feeding;
      if (s.fed + s.feeding < int64_t(s.req.prompt.size())) continue;  // no token this step
      ++decoded;
      (s.made == 0 ? ttft : itl)
          .push_back(now - (s.made == 0 ? s.out->submitted_ : s.last_token_at));
    }
    std::lock_guard lock(mutex_);
    EngineMetrics& m = metrics_;
    ++m.steps;
    m.step_rows += rows;
    m.step_sequences += int64_t(in_step.size());
    m.completion_tokens += decoded;
    m.prompt_tokens += prefilled;
    if (prefilled == 0) ++m.decode_steps, m.decode_step_seconds += now - t0;
    static const std::vector<double> batch_bounds(std::begin(kBatchBuckets),
                                                  std::end(kBatchBuckets));
    add_to_histogram(m.batch_hist, double(in_step.size()), batch_bounds);
    for (double v : ttft) {
      add_to_histogram(m.ttft_hist, v, kLatencyBuckets);
      m.ttft_sum += v, ++m.ttft_count;
    }
    for (double v : itl) {
      add_to_histogram(m.itl_hist, v, kLatencyBuckets);
      m.itl_sum += v, ++m.itl_count;
    }
    double touched = 0;
    for (size_t l = 0; l < routing.layers.size(); ++l) {
      const RoutingStats& st = routing.layers[l];
      for (size_t e = 0; e < st.demand.size(); ++e) {
        m.routed[l][e] += st.demand[e];
        m.dropped[l][e] += st.demand[e] - st.rows[e];
        touched += st.demand[e] > 0;
      }
    }
    if (!routing.layers.empty()) m.experts_touched_sum += touched / double(routing.layers.size());
  }

  SamplerScratch scratch;
  int64_t row_end = 0;
  for (size_t i = 0; i < in_step.size(); ++i) {
    Sequence& s = *in_step[i];
    row_end += int64_t(tokens[i].size());
    if (s.feeding > 0) {
      s.fed += s.feeding;
      s.feeding = 0;
      if (s.fed < int64_t(s.req.prompt.size())) continue;  // more prompt to feed first
    }
    const int32_t t =
        sample_token({logits.data<float>() + i * size_t(shape_.vocab), size_t(shape_.vocab)},
                     s.req.sampling, s.rng, s.made, scratch);
    ++s.made;
    s.last = t;
    s.last_token_at = now;
    const bool end = model_->is_end(t);
    const std::string text = end ? std::string() : s.text.push(s.detok->push(t));
    {
      std::lock_guard lock(s.out->mutex_);
      Completion::Update& u = s.out->pending_;
      u.text += text;
      u.tokens.push_back(t);
      std::vector<int32_t>& ex = u.experts.emplace_back();
      for (const auto& layer : routing.top1) ex.push_back(layer[size_t(row_end - 1)]);
      s.out->made_ = s.made;
      if (s.made == 1) s.out->first_token_ = now;
    }
    s.out->changed_.notify_all();
    if (end || s.text.stopped())
      finish(s, Finish::kStop);
    else if (s.made >= s.req.max_tokens || s.state->n_pos() >= shape_.context)
      finish(s, Finish::kLength);
  }
}

}  // namespace sy
