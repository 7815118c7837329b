// `switchyard serve`: an HTTP/1.1 server (cpp-httplib) in front of the engine, with the
// OpenAI completions API.
//
//   POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream
//   GET  /v1/models        the one model served
//   GET  /health           200 while serving, 503 once stopping
//   GET  /metrics          Prometheus text: requests, tokens, latencies, batch, KV, experts
//   GET  /                 a page: prompt in, tokens streaming out coloured by their expert
//   GET  /switchyard/info  the model's shape, for that page
//
// Errors are JSON, {"error": {"message", "type", "param", "code"}}, and name the field or the
// limit: 400 for a bad request, 404 for another model or path, 413 for a body over the limit,
// 429 (with Retry-After) when the engine's queue is full, 503 once stopping. Unknown fields are
// ignored, as OpenAI's API does for forward compatibility and as the clients built for it
// expect (they send fields such as "user"); known fields this server cannot honour (n > 1,
// best_of > 1, logprobs, echo, suffix) are refused rather than ignored, since a client asking
// for them would otherwise get an answer that silently lacks what it asked for.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "switchyard/serve/engine.h"

namespace sy {

struct ServerOptions {
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  int port = 8080;                 // 0: a free port (Server::port() says which)
  std::string model_name = "switchyard";
  size_t max_body_bytes = 1 << 20;
  double request_timeout_s = 300;  // a request's deadline from its arrival; 0: none
  int http_threads = 0;            // 0: enough for every running and waiting request
};

class Server {
 public:
  Server(Engine& engine, const ServerOptions& options);  // binds; throws IoError
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const { return port_; }
  // Serves until stop(); returns then.
  void run();
  // From any thread (a signal watcher): /health turns 503, the engine ends running
  // completions (streams get their last event and [DONE]), then the listener closes.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace sy
