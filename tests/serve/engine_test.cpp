// The serving engine: batched completions equal each request generated alone with its seed
// (continuous batching, chunked prefill, requests joining and leaving between steps), the text
// stream (UTF-8 held and replaced, stop strings), admission limits, cancellation, deadlines,
// shutdown, request errors and the counters.
#include "switchyard/serve/engine.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "switchyard/core/rng.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/io/tokenizer.h"
#include "switchyard/kernels/backend.h"

namespace sy {
namespace {

LmConfig byte_model(int64_t context) {
  LmConfig cfg;
  cfg.vocab = 256;
  cfg.context = context;
  cfg.d_model = 16;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.moe_every = 1;
  cfg.moe.n_experts = 4;
  cfg.moe.top_k = 2;
  cfg.moe.d_ff = 24;
  // Training's eval capacity would drop slots depending on what a token is batched with; the
  // engine runs dropless.
  cfg.moe.capacity_factor_eval = 1.0;
  return cfg;
}

// What a request gives alone: the whole prompt at once, then one token per step.
std::vector<int32_t> alone(const LmConfig& cfg, const LmParams& p, const CompletionRequest& r) {
  LmConfig c = cfg;
  c.moe.dropless = true;
  const LanguageModel model(c);
  ExecContext ctx;
  ctx.training = false;
  DecodeState state = model.start(DType::kF32);
  std::vector<float> logits;
  model.decode(p, r.prompt, state, logits, ctx);
  const Philox rng = sampling_stream(r.seed);
  SamplerScratch scratch;
  std::vector<int32_t> out;
  for (int64_t i = 0; i < r.max_tokens; ++i) {
    out.push_back(sample_token(logits, r.sampling, rng, i, scratch));
    if (state.n_pos() >= cfg.context) break;
    model.decode(p, std::span<const int32_t>(&out.back(), 1), state, logits, ctx);
  }
  return out;
}

struct Result {
  std::vector<int32_t> tokens;
  std::string text;
  Finish finish = Finish::kNone;
  size_t updates = 0;
  std::vector<std::vector<int32_t>> experts;
};

Result drain(Completion& c) {
  Result r;
  for (;;) {
    Completion::Update u = c.next();
    r.tokens.insert(r.tokens.end(), u.tokens.begin(), u.tokens.end());
    r.experts.insert(r.experts.end(), u.experts.begin(), u.experts.end());
    r.text += u.text;
    ++r.updates;
    if (u.done) {
      r.finish = u.finish;
      return r;
    }
  }
}

CompletionRequest request(int64_t prompt_len, uint64_t seed, int64_t max_tokens,
                          double temperature) {
  CompletionRequest r;
  const Philox rng(seed, 99);
  for (int64_t i = 0; i < prompt_len; ++i)
    r.prompt.push_back(int32_t(rng.bits(uint64_t(i))[0] % 256));
  r.max_tokens = max_tokens;
  r.seed = seed;
  r.sampling.temperature = temperature;
  r.sampling.top_p = 0.9;
  return r;
}

TEST(Engine, BatchedCompletionsEqualEachAlone) {
  const LmConfig cfg = byte_model(48);
  const LmParams p = init_lm_params(cfg, DType::kF32, 3);
  // Odd prompts, some longer than a prefill chunk, greedy and sampled, more requests than
  // the batch so that some wait and join as others leave.
  std::vector<CompletionRequest> reqs;
  const int64_t lens[] = {1, 7, 23, 3, 40, 11, 5, 17, 2};
  for (int i = 0; i < 9; ++i)
    reqs.push_back(request(lens[i], 100 + uint64_t(i), 5 + 3 * i, i % 3 == 0 ? 0.0 : 0.8));
  for (const EngineOptions opt :
       {EngineOptions{.max_batch = 4, .prefill_chunk = 5, .step_tokens = 9},
        EngineOptions{.max_batch = 1, .prefill_chunk = 64, .step_tokens = 64},
        EngineOptions{.max_batch = 9, .prefill_chunk = 3, .step_tokens = 12}}) {
    Engine engine(cfg, p, opt);
    std::vector<std::shared_ptr<Completion>> cs;
    for (const CompletionRequest& r : reqs) cs.push_back(engine.submit(r));
    int64_t total = 0, prompts = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const Result got = drain(*cs[i]);
      const std::vector<int32_t> want = alone(cfg, p, reqs[i]);
      EXPECT_EQ(got.tokens, want) << "request " << i << ", max_batch " << opt.max_batch;
      EXPECT_EQ(got.finish, Finish::kLength) << "request " << i;
      ASSERT_EQ(got.experts.size(), got.tokens.size());
      for (const auto& e : got.experts) {
        ASSERT_EQ(int64_t(e.size()), cfg.n_moe_layers());
        for (int32_t x : e) EXPECT_TRUE(x >= 0 && x < cfg.moe.n_experts);
      }
      total += int64_t(got.tokens.size());
      prompts += int64_t(reqs[i].prompt.size());
      EXPECT_EQ(cs[i]->completion_tokens(), int64_t(got.tokens.size()));
      EXPECT_GE(cs[i]->first_token_at(), cs[i]->submitted_at());
    }
    const EngineMetrics m = engine.metrics();
    EXPECT_EQ(m.completion_tokens, total);
    EXPECT_EQ(m.prompt_tokens, prompts);
    EXPECT_EQ(m.requests_finished, int64_t(reqs.size()));
    EXPECT_EQ(m.finished_by_reason[size_t(Finish::kLength)], int64_t(reqs.size()));
    EXPECT_EQ(m.ttft_count, int64_t(reqs.size()));
    EXPECT_EQ(m.itl_count, total - int64_t(reqs.size()));
    // Every row fed went to k experts in each MoE layer, none dropped.
    for (size_t l = 0; l < m.routed.size(); ++l) {
      int64_t routed = 0, dropped = 0;
      for (size_t e = 0; e < m.routed[l].size(); ++e)
        routed += m.routed[l][e], dropped += m.dropped[l][e];
      EXPECT_EQ(routed, m.step_rows * cfg.moe.top_k) << "layer " << l;
      EXPECT_EQ(dropped, 0);
    }
    // Rows fed: every prompt token, and every sampled token but each request's last.
    EXPECT_EQ(m.step_rows, prompts + total - int64_t(reqs.size()));
    int64_t steps = 0;
    for (int64_t c : m.batch_hist) steps += c;
    EXPECT_EQ(steps, m.steps);
  }
}

TEST(Engine, ContextEndFinishesWithLength) {
  const LmConfig cfg = byte_model(16);
  const LmParams p = init_lm_params(cfg, DType::kF32, 4);
  Engine engine(cfg, p, {});
  CompletionRequest r = request(10, 5, 100, 0.0);
  const Result got = drain(*engine.submit(r));
  // 10 prompt positions; tokens are sampled until the cache holds 16 positions.
  EXPECT_EQ(got.tokens.size(), 7u);
  EXPECT_EQ(got.finish, Finish::kLength);
  EXPECT_EQ(got.tokens, alone(cfg, p, r));
}

TEST(TextStream, HoldsIncompleteCharactersAndReplacesBadBytes) {
  TextStream t;
  std::string out;
  const std::string text = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80z";  // a é € 😀 z
  std::vector<std::string> pieces;
  for (unsigned char b : text) pieces.push_back(t.push(b));
  EXPECT_EQ(pieces[1], "");  // first byte of é: held
  EXPECT_EQ(pieces[2], "\xC3\xA9");
  EXPECT_EQ(pieces[6], "");
  EXPECT_EQ(pieces[9], "\xF0\x9F\x98\x80");
  for (const auto& s : pieces) out += s;
  EXPECT_EQ(out + t.flush(), text);

  TextStream bad;
  std::string got;
  for (unsigned char b : std::string("\x80x\xC3(\xED\xA0\x80\xF5")) got += bad.push(b);
  got += bad.flush();
  // A lone continuation, a lead followed by ASCII, a surrogate (ED A0..), a byte never valid.
  EXPECT_EQ(got, "\xEF\xBF\xBDx\xEF\xBF\xBD(\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");

  TextStream subpart;
  std::string two;
  for (unsigned char b : std::string("\xE2\x82x")) two += subpart.push(b);
  EXPECT_EQ(two, "\xEF\xBF\xBDx");  // E2 82 is one maximal subpart: one U+FFFD

  TextStream cut;
  std::string sent;
  for (unsigned char b : std::string("ab\xE2\x82")) sent += cut.push(b);
  EXPECT_EQ(sent, "ab");
  EXPECT_EQ(cut.flush(), "\xEF\xBF\xBD");  // a character cut short at the end
}

TEST(TextStream, StopsBeforeTheStopStringAndHoldsItsPrefix) {
  TextStream t({"\n\n", "END"});
  std::string out;
  std::vector<std::string> pieces;
  for (unsigned char b : std::string("one\ntwo EN")) pieces.push_back(t.push(b));
  EXPECT_EQ(pieces[3], "");     // "\n" may begin "\n\n"
  EXPECT_EQ(pieces[4], "\nt");  // not: both go out
  EXPECT_EQ(pieces[8], "");     // "E", "EN" held
  EXPECT_EQ(pieces[9], "");
  for (const auto& s : pieces) out += s;
  EXPECT_EQ(out, "one\ntwo ");
  EXPECT_FALSE(t.stopped());
  EXPECT_EQ(t.push('D'), "");
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.push('x'), "");
  EXPECT_EQ(t.flush(), "");

  TextStream u({"END"});
  std::string got;
  for (unsigned char b : std::string("ENxEND")) got += u.push(b);
  EXPECT_EQ(got, "ENx");  // a prefix that did not complete goes out
  EXPECT_TRUE(u.stopped());
}

TEST(Engine, StopStringEndsACompletion) {
  const LmConfig cfg = byte_model(48);
  const LmParams p = init_lm_params(cfg, DType::kF32, 3);
  Engine engine(cfg, p, {});
  CompletionRequest r = request(4, 7, 30, 0.0);
  const std::vector<int32_t> want = alone(cfg, p, r);
  // Stop at the 4th and 5th bytes the request produces alone.
  r.stop = {std::string{char(want[3]), char(want[4])}};
  const Result got = drain(*engine.submit(r));
  EXPECT_EQ(got.finish, Finish::kStop);
  ASSERT_GE(got.tokens.size(), 5u);
  EXPECT_TRUE(std::equal(got.tokens.begin(), got.tokens.end(), want.begin()));
  // The text is what came before the stop string (bytes as UTF-8 or U+FFFD).
  TextStream plain;
  std::string before;
  for (size_t i = 0; i < got.tokens.size(); ++i) before += plain.push(uint8_t(got.tokens[i]));
  EXPECT_LE(got.text.size(), before.size() + 6);
  EXPECT_EQ(got.text.find(r.stop[0]), std::string::npos);
}

TEST(Engine, RefusesBeyondTheQueueAndCancels) {
  const LmConfig cfg = byte_model(512);
  const LmParams p = init_lm_params(cfg, DType::kF32, 3);
  Engine engine(cfg, p, {.max_batch = 1, .max_waiting = 0, .step_tokens = 64});
  std::shared_ptr<Completion> first = engine.submit(request(3, 1, 500, 0.8));
  EXPECT_THROW(engine.submit(request(3, 2, 5, 0.8)), Overloaded);
  EXPECT_EQ(engine.metrics().requests_refused, 1);
  const Completion::Update u = first->next();
  EXPECT_FALSE(u.tokens.empty());
  first->cancel();
  const Result rest = drain(*first);
  EXPECT_EQ(rest.finish, Finish::kCancelled);
  EXPECT_LT(first->completion_tokens(), 500);
  // The slot is free again.
  EXPECT_EQ(drain(*engine.submit(request(3, 2, 5, 0.8))).tokens.size(), 5u);
}

TEST(Engine, DeadlineAndShutdown) {
  const LmConfig cfg = byte_model(512);
  const LmParams p = init_lm_params(cfg, DType::kF32, 3);
  auto engine = std::make_unique<Engine>(cfg, p, EngineOptions{.max_batch = 2});
  CompletionRequest late = request(3, 1, 50, 0.8);
  late.deadline = wall_seconds() - 1;
  EXPECT_EQ(drain(*engine->submit(late)).finish, Finish::kDeadline);
  std::vector<std::shared_ptr<Completion>> cs;
  for (int i = 0; i < 4; ++i) cs.push_back(engine->submit(request(5, uint64_t(i), 500, 0.8)));
  cs[0]->next();  // running
  engine->shutdown();
  for (auto& c : cs) EXPECT_EQ(drain(*c).finish, Finish::kShutdown);
  EXPECT_THROW(engine->submit(request(3, 1, 5, 0.8)), Error);
  engine.reset();  // joins the scheduler
}

TEST(Engine, BadRequestsNameTheField) {
  const LmConfig cfg = byte_model(32);
  const LmParams p = init_lm_params(cfg, DType::kF32, 3);
  Engine engine(cfg, p, {});
  auto refused = [&](CompletionRequest r, const std::string& field) {
    try {
      engine.submit(std::move(r));
      ADD_FAILURE() << field << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  refused(request(0, 1, 5, 0.8), "prompt is empty");
  refused(request(33, 1, 5, 0.8), "prompt: 33 tokens, the model's context is 32");
  refused(request(3, 1, 0, 0.8), "max_tokens 0");
  refused(request(3, 1, 5, -1), "temperature -1");
  CompletionRequest r = request(3, 1, 5, 0.8);
  r.sampling.top_p = 0;
  refused(r, "top_p 0");
  r = request(3, 1, 5, 0.8);
  r.stop = {"a", "b", "c", "d", "e"};
  refused(r, "stop: 5 strings");
  r.stop = {""};
  refused(r, "stop: an empty string");
  LmConfig words = cfg;
  words.vocab = 300;
  EXPECT_THROW(Engine(words, init_lm_params(words, DType::kF32, 1), {}), ConfigError);
  EXPECT_THROW(Engine(cfg, p, {.max_batch = 8, .step_tokens = 4}), ConfigError);
}

// Hugging Face models through the engine: greedy completions equal transformers' greedy tokens
// from the fixture (up to an end-of-text token, which ends the completion), the streamed text
// equals the tokenizer's decoding of the tokens, and three requests batched give what each
// gives alone. Mixtral's tokenizer is SentencePiece-style (a leading space per word, stripped
// at the start of a text), Qwen3-MoE's byte-level BPE.
class HfEngine : public ::testing::TestWithParam<std::string> {};

TEST_P(HfEngine, GreedyEqualsTransformersAndBatchedEqualsAlone) {
  const std::string dir = std::string(SY_FIXTURES) + "/models/" + GetParam();
  std::ifstream in(dir + "/expected.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const auto want = nlohmann::json::parse(ss.str());
  const auto greedy = want["greedy"].get<std::vector<int32_t>>();
  const std::string prompt = want["prompt"].get<std::string>();
  const HfModel loaded = load_hf_model(dir);
  const Tokenizer tok = *loaded.tokenizer;
  const std::vector<int32_t> eos = loaded.eos_ids;

  EngineOptions one;
  one.max_batch = 1;
  Engine alone_engine(serve_hf_model(load_hf_model(dir), one), one);
  EXPECT_EQ(alone_engine.model().encode(prompt), want["input_ids"].get<std::vector<int32_t>>());
  auto greedy_request = [&](const Engine& e, std::string_view text, int64_t n) {
    CompletionRequest r;
    r.prompt = e.model().encode(text);
    r.max_tokens = n;
    r.sampling.temperature = 0;
    return r;
  };
  const Result r = drain(*alone_engine.submit(greedy_request(alone_engine, prompt, 32)));
  // transformers' 32 greedy tokens, cut after the first end-of-text token if one comes.
  std::vector<int32_t> expect;
  for (int32_t t : greedy) {
    expect.push_back(t);
    if (std::find(eos.begin(), eos.end(), t) != eos.end()) break;
  }
  EXPECT_EQ(r.tokens, expect) << GetParam();
  EXPECT_EQ(r.finish, expect.size() < greedy.size() ? Finish::kStop : Finish::kLength);
  std::vector<int32_t> shown = r.tokens;
  if (r.finish == Finish::kStop) shown.pop_back();  // the end-of-text token adds no text
  EXPECT_EQ(r.text, sanitize_utf8(tok.decode(shown, /*skip_special_tokens=*/true))) << GetParam();

  EngineOptions three;
  three.max_batch = 3;
  three.prefill_chunk = 5;  // prompts over several steps beside the others' decodes
  Engine batched(serve_hf_model(load_hf_model(dir), three), three);
  const std::vector<std::string> prompts = {prompt.substr(0, 20), prompt.substr(5, 9),
                                            prompt.substr(30, 25)};
  std::vector<std::shared_ptr<Completion>> running;
  for (const std::string& p : prompts)
    running.push_back(batched.submit(greedy_request(batched, p, 12)));
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Result b = drain(*running[i]);
    const Result a = drain(*alone_engine.submit(greedy_request(alone_engine, prompts[i], 12)));
    EXPECT_EQ(b.tokens, a.tokens) << GetParam() << " prompt " << i;
    EXPECT_EQ(b.text, a.text) << GetParam() << " prompt " << i;
  }
}

// On a bf16 backend the served model's f32 experts are rounded to bf16 once at start: it serves
// (every token sampled, within the vocabulary), where this CPU has such a backend.
TEST(HfEngineBf16, ServesWithBf16Experts) {
  const Backend* bf16_backend = nullptr;
  for (const Backend* b : available_backends(cpu_features()))
    if (b->precision == Precision::kBf16) bf16_backend = b;
  if (bf16_backend == nullptr) GTEST_SKIP() << "no bf16 backend on this CPU";
  EngineOptions o;
  o.backend = bf16_backend;
  const std::string dir = std::string(SY_FIXTURES) + "/models/qwen3_moe";
  Engine e(serve_hf_model(load_hf_model(dir), o), o);
  CompletionRequest r;
  r.prompt = e.model().encode("It is a truth universally acknowledged");
  r.max_tokens = 10;
  r.sampling.temperature = 0;
  const Result got = drain(*e.submit(r));
  ASSERT_FALSE(got.tokens.empty());
  for (int32_t t : got.tokens) EXPECT_LT(t, e.shape().vocab);
  EXPECT_TRUE(got.finish == Finish::kLength || got.finish == Finish::kStop);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfEngine, ::testing::Values("mixtral", "qwen3_moe", "olmoe"));

}  // namespace
}  // namespace sy
