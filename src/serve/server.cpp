// The HTTP front of the engine: see server.h. cpp-httplib (Debian's libcpp-httplib-dev): a
// well-kept single-purpose HTTP/1.1 library with a thread pool, chunked responses for
// server-sent events and limits on body size and timeouts, which is all this needs; a
// framework (Boost.Beast, Drogon) would bring far more than that.
#include "switchyard/serve/server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>

namespace sy {

namespace {

using nlohmann::json;

// A request the client got wrong: the field it names, and the status to send.
struct BadRequest {
  int status;
  std::string message, param, type;
};

std::string error_body(const std::string& message, const std::string& type,
                       const std::string& param) {
  json e = {{"message", message}, {"type", type}, {"code", nullptr}};
  e["param"] = param.empty() ? json(nullptr) : json(param);
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type = "invalid_request_error", const std::string& param = "") {
  res.status = status;
  res.set_content(error_body(message, type, param), "application/json");
}

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw BadRequest{400, message, param, "invalid_request_error"};
}

const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

double number(const json& body, const char* name, double fallback) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_number())
    bad(name, fmt::format("{}: expected a number, got {}", name, v->type_name()));
  return v->get<double>();
}

int64_t integer(const json& body, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer() && !v->is_number_unsigned())
    bad(name, fmt::format("{}: expected an integer, got {}", name, v->type_name()));
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(hi))
    bad(name, fmt::format("{}: {} is over the limit of {}", name, v->dump(), hi));
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) bad(name, fmt::format("{}: {}, expected {}..{}", name, x, lo, hi));
  return x;
}

bool boolean(const json& body, const char* name, bool fallback) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_boolean())
    bad(name, fmt::format("{}: expected true or false, got {}", name, v->type_name()));
  return v->get<bool>();
}

struct Parsed {
  CompletionRequest request;
  bool stream = false;
  bool experts = false;  // the Switchyard extension: each token's experts in the events
};

Parsed parse_completion(const std::string& text, const Engine& engine, const std::string& model,
                        uint64_t fallback_seed) {
  json body;
  try {
    body = json::parse(text);
  } catch (const json::parse_error& e) {
    bad("", fmt::format("body: not JSON ({})", e.what()));
  }
  if (!body.is_object())
    bad("", fmt::format("body: expected a JSON object, got {}", body.type_name()));
  if (const json* m = field(body, "model")) {
    if (!m->is_string())
      bad("model", fmt::format("model: expected a string, got {}", m->type_name()));
    if (m->get<std::string>() != model)
      throw BadRequest{404,
                       fmt::format("model '{}' is not served here; this server serves '{}'",
                                   m->get<std::string>(), model),
                       "model", "model_not_found"};
  }
  Parsed p;
  const json* prompt = field(body, "prompt");
  if (prompt == nullptr) bad("prompt", "prompt: required, a string");
  if (prompt->is_array()) {
    if (prompt->size() != 1 || !(*prompt)[0].is_string())
      bad("prompt",
          "prompt: a string, or a list of exactly one string (batches: send requests "
          "side by side, they are batched here)");
    prompt = &(*prompt)[0];
  }
  if (!prompt->is_string())
    bad("prompt", fmt::format("prompt: expected a string, got {}", prompt->type_name()));
  const ServedModel::Shape shape = engine.shape();
  const std::string& text_in = prompt->get_ref<const std::string&>();
  if (text_in.empty()) bad("prompt", "prompt: empty, expected at least one character");
  p.request.prompt = engine.model().encode(text_in);
  if (int64_t(p.request.prompt.size()) > shape.context)
    bad("prompt", fmt::format("prompt: {} tokens, over the model's context of {}",
                              p.request.prompt.size(), shape.context));
  p.request.max_tokens = integer(body, "max_tokens", 16, 1, shape.context);
  p.request.sampling.temperature = number(body, "temperature", 1.0);
  p.request.sampling.top_p = number(body, "top_p", 1.0);
  p.request.sampling.top_k = integer(body, "top_k", 0, 0, shape.vocab);
  if (!(p.request.sampling.temperature >= 0 && p.request.sampling.temperature <= 2))
    bad("temperature",
        fmt::format("temperature: {}, expected 0..2", p.request.sampling.temperature));
  if (!(p.request.sampling.top_p > 0 && p.request.sampling.top_p <= 1))
    bad("top_p", fmt::format("top_p: {}, expected in (0, 1]", p.request.sampling.top_p));
  p.request.seed = uint64_t(integer(body, "seed", int64_t(fallback_seed >> 1), 0, INT64_MAX));
  if (const json* stop = field(body, "stop")) {
    const json list = stop->is_string() ? json::array({*stop}) : *stop;
    if (!list.is_array())
      bad("stop",
          fmt::format("stop: expected a string or a list of strings, got {}", stop->type_name()));
    if (list.size() > 4) bad("stop", fmt::format("stop: {} strings, at most 4", list.size()));
    for (const json& s : list) {
      if (!s.is_string() || s.get_ref<const std::string&>().empty())
        bad("stop", "stop: each entry must be a non-empty string");
      p.request.stop.push_back(s.get<std::string>());
    }
  }
  p.stream = boolean(body, "stream", false);
  p.experts = boolean(body, "switchyard_experts", false);
  if (integer(body, "n", 1, 1, 1 << 20) != 1) bad("n", "n: only 1 completion per request");
  if (integer(body, "best_of", 1, 1, 1 << 20) != 1) bad("best_of", "best_of: only 1");
  if (field(body, "logprobs") != nullptr) bad("logprobs", "logprobs: not supported");
  if (boolean(body, "echo", false)) bad("echo", "echo: not supported");
  if (field(body, "suffix") != nullptr) bad("suffix", "suffix: not supported");
  return p;
}

std::string finish_reason(Finish f) {
  return f == Finish::kCancelled ? "cancelled" : finish_name(f);
}

// Prometheus text exposition of the engine's counters.
std::string prometheus(const EngineMetrics& m, const std::vector<int64_t>& by_status,
                       const std::string& model) {
  std::string o;
  auto metric = [&](const char* name, const char* type, const char* help) {
    o += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
  };
  const std::string lbl = fmt::format("model=\"{}\"", model);
  metric("switchyard_requests_total", "counter", "HTTP completion requests answered, by status");
  for (int s : {200, 400, 404, 413, 429, 500, 503})
    if (by_status[size_t(s)] > 0)
      o += fmt::format("switchyard_requests_total{{{},status=\"{}\"}} {}\n", lbl, s,
                       by_status[size_t(s)]);
  metric("switchyard_completions_total", "counter", "Completions ended, by finish reason");
  for (Finish f :
       {Finish::kLength, Finish::kStop, Finish::kCancelled, Finish::kDeadline, Finish::kShutdown})
    o += fmt::format("switchyard_completions_total{{{},reason=\"{}\"}} {}\n", lbl, finish_name(f),
                     m.finished_by_reason[size_t(f)]);
  metric("switchyard_prompt_tokens_total", "counter", "Prompt tokens fed");
  o += fmt::format("switchyard_prompt_tokens_total{{{}}} {}\n", lbl, m.prompt_tokens);
  metric("switchyard_completion_tokens_total", "counter", "Tokens generated");
  o += fmt::format("switchyard_completion_tokens_total{{{}}} {}\n", lbl, m.completion_tokens);
  metric("switchyard_sequences_running", "gauge", "Sequences in the batch");
  o += fmt::format("switchyard_sequences_running{{{}}} {}\n", lbl, m.running);
  metric("switchyard_sequences_waiting", "gauge", "Requests queued for the batch");
  o += fmt::format("switchyard_sequences_waiting{{{}}} {}\n", lbl, m.waiting);
  metric("switchyard_kv_cache_positions", "gauge", "KV cache positions filled / budget");
  o += fmt::format("switchyard_kv_cache_positions{{{},kind=\"used\"}} {}\n", lbl, m.kv_used);
  o +=
      fmt::format("switchyard_kv_cache_positions{{{},kind=\"capacity\"}} {}\n", lbl, m.kv_capacity);
  auto histogram = [&](const char* name, const char* help, const std::vector<int64_t>& h,
                       std::span<const double> bounds, double sum, int64_t count) {
    metric(name, "histogram", help);
    int64_t cum = 0;
    for (size_t b = 0; b < bounds.size(); ++b) {
      cum += b < h.size() ? h[b] : 0;
      o += fmt::format("{}_bucket{{{},le=\"{}\"}} {}\n", name, lbl, bounds[b], cum);
    }
    o += fmt::format("{}_bucket{{{},le=\"+Inf\"}} {}\n{}_sum{{{}}} {}\n{}_count{{{}}} {}\n", name,
                     lbl, count, name, lbl, sum, name, lbl, count);
  };
  histogram("switchyard_time_to_first_token_seconds", "From arrival to the first token",
            m.ttft_hist, kLatencyBuckets, m.ttft_sum, m.ttft_count);
  histogram("switchyard_inter_token_latency_seconds", "Between a sequence's tokens", m.itl_hist,
            kLatencyBuckets, m.itl_sum, m.itl_count);
  std::vector<double> batch(std::begin(kBatchBuckets), std::end(kBatchBuckets));
  int64_t steps = 0;
  for (int64_t c : m.batch_hist) steps += c;
  histogram("switchyard_batch_sequences", "Sequences per model step", m.batch_hist, batch,
            double(m.step_sequences), steps);
  metric("switchyard_experts_touched_per_step", "gauge",
         "Mean over steps of the distinct experts a step's rows chose, mean over MoE layers");
  o += fmt::format("switchyard_experts_touched_per_step{{{}}} {}\n", lbl,
                   m.steps > 0 ? m.experts_touched_sum / double(m.steps) : 0.0);
  metric("switchyard_expert_tokens_total", "counter", "Slots routed to each expert, per MoE layer");
  for (size_t l = 0; l < m.routed.size(); ++l)
    for (size_t e = 0; e < m.routed[l].size(); ++e)
      o += fmt::format("switchyard_expert_tokens_total{{{},layer=\"{}\",expert=\"{}\"}} {}\n", lbl,
                       l, e, m.routed[l][e]);
  metric("switchyard_expert_dropped_total", "counter",
         "Slots dropped at each expert (dropless: 0)");
  for (size_t l = 0; l < m.dropped.size(); ++l)
    for (size_t e = 0; e < m.dropped[l].size(); ++e)
      o += fmt::format("switchyard_expert_dropped_total{{{},layer=\"{}\",expert=\"{}\"}} {}\n", lbl,
                       l, e, m.dropped[l][e]);
  return o;
}

}  // namespace

struct Server::Impl {
  Engine& engine;
  ServerOptions opt;
  httplib::Server http;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> next_id{1};
  std::mutex status_mutex;
  std::vector<int64_t> by_status = std::vector<int64_t>(600, 0);

  Impl(Engine& e, const ServerOptions& o) : engine(e), opt(o) {}

  void count(int status) {
    std::lock_guard lock(status_mutex);
    if (status >= 0 && status < 600) ++by_status[size_t(status)];
  }

  json chunk(const std::string& id, std::time_t created, const std::string& text,
             const Completion::Update* u, const char* finish, bool experts) const {
    json choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}};
    choice["finish_reason"] = finish == nullptr ? json(nullptr) : json(finish);
    json c = {{"id", id},
              {"object", "text_completion"},
              {"created", created},
              {"model", opt.model_name},
              {"choices", json::array({choice})}};
    if (experts && u != nullptr) c["switchyard"] = {{"tokens", u->tokens}, {"experts", u->experts}};
    return c;
  }

  void completions(const httplib::Request& req, httplib::Response& res) {
    if (stopping) {
      count(503);
      return send_error(res, 503, "the server is stopping", "unavailable");
    }
    Parsed p;
    std::shared_ptr<Completion> c;
    const uint64_t n = next_id++;
    try {
      p = parse_completion(req.body, engine, opt.model_name,
                           n * 0x9E3779B97F4A7C15ull ^ uint64_t(std::time(nullptr)));
      if (opt.request_timeout_s > 0) p.request.deadline = wall_seconds() + opt.request_timeout_s;
      c = engine.submit(p.request);
    } catch (const BadRequest& e) {
      count(e.status);
      return send_error(res, e.status, e.message, e.type, e.param);
    } catch (const Overloaded& e) {
      count(429);
      res.set_header("Retry-After", "1");
      return send_error(res, 429, e.what(), "rate_limit_error");
    } catch (const ConfigError& e) {
      count(400);
      return send_error(res, 400, e.what());
    } catch (const Error& e) {
      count(503);
      return send_error(res, 503, e.what(), "unavailable");
    }
    const std::string id = fmt::format("cmpl-{}", n);
    const std::time_t created = std::time(nullptr);
    count(200);
    if (!p.stream) {
      std::string text;
      Completion::Update u;
      std::vector<int32_t> tokens;
      std::vector<std::vector<int32_t>> experts;
      do {
        u = c->next();
        text += u.text;
        tokens.insert(tokens.end(), u.tokens.begin(), u.tokens.end());
        experts.insert(experts.end(), u.experts.begin(), u.experts.end());
      } while (!u.done);
      Completion::Update all{text, tokens, experts, true, u.finish};
      json body = chunk(id, created, text, &all, finish_reason(u.finish).c_str(), p.experts);
      const int64_t made = c->completion_tokens();
      body["usage"] = {{"prompt_tokens", c->prompt_tokens()},
                       {"completion_tokens", made},
                       {"total_tokens", c->prompt_tokens() + made}};
      res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n",
                      "application/json");
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, c, id, created, experts = p.experts](size_t, httplib::DataSink& sink) {
          // Waits a little at a time: an idle stream sends an SSE comment, which is how a
          // vanished client is noticed (the write fails) even while nothing is produced.
          const Completion::Update u = c->next(0.5);
          std::string out;
          if (!u.text.empty() || !u.tokens.empty())
            out += "data: " +
                   chunk(id, created, u.text, &u, nullptr, experts)
                       .dump(-1, ' ', false, json::error_handler_t::replace) +
                   "\n\n";
          if (u.done) {
            out += "data: " +
                   chunk(id, created, "", nullptr, finish_reason(u.finish).c_str(), false)
                       .dump(-1, ' ', false, json::error_handler_t::replace) +
                   "\n\ndata: [DONE]\n\n";
          }
          if (out.empty()) out = ": waiting\n\n";
          if (!sink.write(out.data(), out.size())) {
            c->cancel();
            return false;
          }
          if (u.done) sink.done();
          return true;
        },
        [c](bool success) {
          if (!success) c->cancel();  // the client went away mid-stream
        });
  }
};

Server::Server(Engine& engine, const ServerOptions& options)
    : impl_(std::make_unique<Impl>(engine, options)) {
  Impl& s = *impl_;
  const EngineOptions& eo = engine.options();
  const int threads = options.http_threads > 0
                          ? options.http_threads
                          : int(std::min<int64_t>(1024, eo.max_batch + eo.max_waiting + 8));
  s.http.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  s.http.set_payload_max_length(options.max_body_bytes);
  s.http.set_read_timeout(10, 0);   // a client that stalls sending its request
  s.http.set_write_timeout(10, 0);  // or stops reading a stream
  s.http.set_keep_alive_timeout(5);
  s.http.Post("/v1/completions", [&s](const httplib::Request& req, httplib::Response& res) {
    s.completions(req, res);
  });
  s.http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    static const char kPage[] =
#include "serve_page.inc"
        ;
    res.set_content(kPage, sizeof(kPage) - 1, "text/html; charset=utf-8");
  });
  s.http.Get("/switchyard/info", [&s](const httplib::Request&, httplib::Response& res) {
    const ServedModel::Shape c = s.engine.shape();
    const json body = {{"name", s.opt.model_name}, {"moe_layers", c.n_moe_layers},
                       {"experts", c.n_experts},   {"top_k", c.top_k},
                       {"context", c.context},     {"vocab", c.vocab}};
    res.set_content(body.dump() + "\n", "application/json");
  });
  s.http.Get("/v1/models", [&s](const httplib::Request&, httplib::Response& res) {
    const json body = {{"object", "list"},
                       {"data", json::array({{{"id", s.opt.model_name},
                                              {"object", "model"},
                                              {"created", 0},
                                              {"owned_by", "switchyard"}}})}};
    res.set_content(body.dump() + "\n", "application/json");
  });
  s.http.Get("/health", [&s](const httplib::Request&, httplib::Response& res) {
    res.status = s.stopping ? 503 : 200;
    res.set_content(json{{"status", s.stopping ? "stopping" : "ok"}}.dump() + "\n",
                    "application/json");
  });
  s.http.Get("/metrics", [&s](const httplib::Request&, httplib::Response& res) {
    std::vector<int64_t> by_status;
    {
      std::lock_guard lock(s.status_mutex);
      by_status = s.by_status;
    }
    res.set_content(prometheus(s.engine.metrics(), by_status, s.opt.model_name),
                    "text/plain; version=0.0.4");
  });
  // What the library answers by itself (no route, a body over the limit, ...) as JSON too.
  s.http.set_error_handler([&s](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // an error of ours, already JSON
    if (res.status == 413) s.count(413);
    const std::string what =
        res.status == 404   ? fmt::format("no route {} {}", req.method, req.path)
        : res.status == 413 ? fmt::format("body over the limit of {} bytes", s.opt.max_body_bytes)
                            : fmt::format("HTTP {}", res.status);
    res.set_content(error_body(what, res.status == 404 ? "not_found" : "invalid_request_error", ""),
                    "application/json");
  });
  s.http.set_exception_handler(
      [&s](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        s.count(500);
        send_error(res, 500, what, "server_error");
      });
  // The library listens with a backlog of 5: a burst of clients connecting at once would
  // have its SYNs dropped and retried a second later. The listening socket is taken as the
  // library makes it and listened on again with a deep backlog (Linux adjusts it in place).
  int listener = -1;
  s.http.set_socket_options([&listener](socket_t sock) {
    httplib::default_socket_options(sock);
    listener = sock;
  });
  port_ = options.port == 0 ? s.http.bind_to_any_port(options.host)
                            : (s.http.bind_to_port(options.host, options.port) ? options.port : -1);
  if (port_ <= 0)
    throw IoError(fmt::format("serve: cannot listen on {}:{} (in use, or not an address here)",
                              options.host, options.port));
  if (listener >= 0) ::listen(listener, SOMAXCONN);
}

Server::~Server() { stop(); }

void Server::run() { impl_->http.listen_after_bind(); }

void Server::stop() {
  if (impl_->stopping.exchange(true)) return;
  impl_->engine.shutdown();
  // Streams end with their last event once the engine has ended them; give them a moment to
  // go out before the listener and its connections close.
  const double until = wall_seconds() + 2;
  while (wall_seconds() < until && impl_->engine.metrics().running > 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  impl_->http.stop();
}

}  // namespace sy
