// The two-joint arm of train/arm.h: dynamics, the demonstrator, episodes.
#include "switchyard/train/arm.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "switchyard/core/error.h"
#include "switchyard/core/rng.h"

namespace sy {

namespace {

struct Dynamics {
  double m11, m12, m22;  // M(q)
  double c1, c2;         // C(q, q')
};

Dynamics dynamics(const ArmConfig& a, const ArmState& s) {
  const double c = std::cos(s.q[1]), h = a.m2 * a.l1 * a.l2 * std::sin(s.q[1]);
  Dynamics d;
  d.m22 = a.m2 * a.l2 * a.l2;
  d.m12 = d.m22 + a.m2 * a.l1 * a.l2 * c;
  d.m11 = (a.m1 + a.m2) * a.l1 * a.l1 + d.m22 + 2 * a.m2 * a.l1 * a.l2 * c;
  d.c1 = -h * (2 * s.dq[0] * s.dq[1] + s.dq[1] * s.dq[1]);
  d.c2 = h * s.dq[0] * s.dq[0];
  return d;
}

// J = d p / d q.
std::array<double, 4> jacobian(const ArmConfig& a, const ArmState& s) {
  const double s1 = std::sin(s.q[0]), c1 = std::cos(s.q[0]);
  const double s12 = std::sin(s.q[0] + s.q[1]), c12 = std::cos(s.q[0] + s.q[1]);
  return {-a.l1 * s1 - a.l2 * s12, -a.l2 * s12,  // dpx/dq1, dpx/dq2
          a.l1 * c1 + a.l2 * c12, a.l2 * c12};   // dpy/dq1, dpy/dq2
}

}  // namespace

std::array<double, 2> arm_hand(const ArmConfig& a, const ArmState& s) {
  return {a.l1 * std::cos(s.q[0]) + a.l2 * std::cos(s.q[0] + s.q[1]),
          a.l1 * std::sin(s.q[0]) + a.l2 * std::sin(s.q[0] + s.q[1])};
}

double arm_kinetic_energy(const ArmConfig& a, const ArmState& s) {
  const Dynamics d = dynamics(a, s);
  return 0.5 * (d.m11 * s.dq[0] * s.dq[0] + 2 * d.m12 * s.dq[0] * s.dq[1] +
                d.m22 * s.dq[1] * s.dq[1]);
}

std::array<double, 2> arm_controller(const ArmConfig& a, const ArmState& s,
                                     const std::array<double, 2>& target) {
  const std::array<double, 2> p = arm_hand(a, s);
  const std::array<double, 4> J = jacobian(a, s);
  const double vx = J[0] * s.dq[0] + J[1] * s.dq[1], vy = J[2] * s.dq[0] + J[3] * s.dq[1];
  const double fx = a.kp * (target[0] - p[0]) - a.kd * vx;
  const double fy = a.kp * (target[1] - p[1]) - a.kd * vy;
  return {std::clamp(J[0] * fx + J[2] * fy, -a.tau_max, a.tau_max),
          std::clamp(J[1] * fx + J[3] * fy, -a.tau_max, a.tau_max)};
}

void arm_step(const ArmConfig& a, ArmState& s, const std::array<double, 2>& tau) {
  const double h = a.dt / double(a.substeps);
  for (int64_t i = 0; i < a.substeps; ++i) {
    const Dynamics d = dynamics(a, s);
    const double r1 = tau[0] - d.c1 - a.damping * s.dq[0];
    const double r2 = tau[1] - d.c2 - a.damping * s.dq[1];
    // M is symmetric positive definite (det = m2 l1^2 l2^2 (m1 + m2 sin^2 q2) > 0).
    const double det = d.m11 * d.m22 - d.m12 * d.m12;
    const double a1 = (d.m22 * r1 - d.m12 * r2) / det, a2 = (d.m11 * r2 - d.m12 * r1) / det;
    s.dq[0] += h * a1;
    s.dq[1] += h * a2;
    s.q[0] += h * s.dq[0];
    s.q[1] += h * s.dq[1];
  }
}

ArmEpisodes arm_episodes(const ArmConfig& a, int64_t n, int64_t steps, uint64_t seed) {
  a.validate();
  SY_CHECK(n >= 0 && steps >= 1, "{} episodes of {} steps", n, steps);
  ArmEpisodes out;
  out.n = n;
  out.steps = steps;
  out.inputs.resize(size_t(n * steps * kArmFeatures));
  out.actions.resize(size_t(n * steps * kArmActions));
  out.final_distance.resize(size_t(n));
  const Philox rng(seed, /*stream=*/0xA53);
  const double pi = std::numbers::pi, reach = a.l1 + a.l2, inner = std::abs(a.l1 - a.l2);
  for (int64_t e = 0; e < n; ++e) {
    auto u = [&](int64_t j) { return double(rng.uniform(uint64_t(e) * 8 + uint64_t(j))); };
    ArmState s;
    s.q = {pi * (2 * u(0) - 1), pi * (2 * u(1) - 1)};
    // A target uniform over the part of the reachable annulus that keeps clear of its edges.
    const double r0 = inner + 0.1 * reach, r1 = 0.9 * reach;
    const double r = std::sqrt(r0 * r0 + u(2) * (r1 * r1 - r0 * r0)), phi = pi * (2 * u(3) - 1);
    const std::array<double, 2> target = {r * std::cos(phi), r * std::sin(phi)};
    std::array<double, 2> prev = {0, 0};
    for (int64_t t = 0; t < steps; ++t) {
      const std::array<double, 2> p = arm_hand(a, s), tau = arm_controller(a, s, target);
      float* in = out.inputs.data() + (e * steps + t) * kArmFeatures;
      const double feats[kArmFeatures] = {std::cos(s.q[0]), std::sin(s.q[0]),  std::cos(s.q[1]),
                                          std::sin(s.q[1]), p[0] / reach,      p[1] / reach,
                                          target[0] / reach, target[1] / reach, prev[0] / a.tau_max,
                                          prev[1] / a.tau_max};
      std::copy(feats, feats + kArmFeatures, in);
      float* act = out.actions.data() + (e * steps + t) * kArmActions;
      act[0] = float(tau[0] / a.tau_max);
      act[1] = float(tau[1] / a.tau_max);
      arm_step(a, s, tau);
      prev = tau;
    }
    const std::array<double, 2> p = arm_hand(a, s);
    out.final_distance[e] = std::hypot(p[0] - target[0], p[1] - target[1]);
  }
  return out;
}

}  // namespace sy
