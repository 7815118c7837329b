// A simulated two-joint planar arm reaching for targets: the control modality of the multimodal
// model (train/multimodal.h). Two rigid links in the horizontal plane (no gravity), point masses
// m1, m2 at the links' far ends, joint angles q = (q1, q2) (q2 relative to link 1), viscous joint
// damping b. With c2 = cos q2, s2 = sin q2, h = m2 l1 l2 s2, the equations of motion are
//   M(q) q'' + C(q, q') + b q' = tau
//   M = [[(m1 + m2) l1^2 + m2 l2^2 + 2 m2 l1 l2 c2,   m2 l2^2 + m2 l1 l2 c2],
//        [m2 l2^2 + m2 l1 l2 c2,                       m2 l2^2            ]]
//   C = [-h (2 q1' q2' + q2'^2),  h q1'^2]
// integrated by semi-implicit Euler (velocity first, then angle) at dt / substeps. The hand is at
//   p = (l1 cos q1 + l2 cos(q1 + q2),  l1 sin q1 + l2 sin(q1 + q2)).
// The demonstrator is an operational-space PD controller: tau = J^T (kp (target - p) - kd p'),
// each torque clipped to [-tau_max, tau_max], held for one control step of dt.
//
// An episode starts from random angles at rest with a random reachable target. The model sees at
// each control step what a camera and the joint encoders would give, without velocities (they
// are to be inferred from the history): cos q1, sin q1, cos q2, sin q2, the hand's position, the
// target's position and the previous step's torques / tau_max (10 features); it is to output this
// step's torques / tau_max (2), the demonstrator's.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace sy {

struct ArmConfig {
  double l1 = 0.5, l2 = 0.5;  // link lengths, m
  double m1 = 1.0, m2 = 1.0;  // masses at the links' ends, kg
  double damping = 0.2;       // b, N m s / rad
  double dt = 0.05;           // control step, s
  int64_t substeps = 10;      // integration steps per control step
  double kp = 40.0, kd = 8.0;  // the demonstrator's gains (N/m, N s/m at the hand)
  double tau_max = 4.0;        // torque limit, N m
  void validate() const;       // throws ConfigError naming `data.arm.<field>`
};

struct ArmState {
  std::array<double, 2> q{}, dq{};  // joint angles (rad) and velocities (rad/s)
};

inline constexpr int64_t kArmFeatures = 10;  // what the model sees per control step
inline constexpr int64_t kArmActions = 2;    // what it outputs

std::array<double, 2> arm_hand(const ArmConfig& cfg, const ArmState& s);
// Kinetic energy 1/2 q'^T M(q) q', J.
double arm_kinetic_energy(const ArmConfig& cfg, const ArmState& s);
// The demonstrator's torques towards target, clipped.
std::array<double, 2> arm_controller(const ArmConfig& cfg, const ArmState& s,
                                     const std::array<double, 2>& target);
// One control step of dt with torques tau held.
void arm_step(const ArmConfig& cfg, ArmState& s, const std::array<double, 2>& tau);

// Episodes of `steps` control steps each, one after another: inputs [n * steps, kArmFeatures],
// actions [n * steps, kArmActions] (row-major), and each episode's final hand-to-target distance.
struct ArmEpisodes {
  int64_t n = 0, steps = 0;
  std::vector<float> inputs, actions;
  std::vector<double> final_distance;
};
// Episode i is a pure function of (cfg, seed, i).
ArmEpisodes arm_episodes(const ArmConfig& cfg, int64_t n, int64_t steps, uint64_t seed);

}  // namespace sy
