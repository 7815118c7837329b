// The two-joint arm: without torque or damping the kinetic energy stays put (the dynamics and
// the integrator); the hand's position is the links' geometry; the demonstrator reaches its
// targets; episodes are a function of the seed and show the model what the header says.
#include "switchyard/train/arm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "switchyard/core/error.h"

namespace sy {
namespace {

TEST(Arm, FreeMotionKeepsItsEnergy) {
  ArmConfig cfg;
  cfg.damping = 0;
  cfg.substeps = 400;
  ArmState s;
  s.q = {0.3, 1.1};
  s.dq = {2.0, -1.5};
  const double e0 = arm_kinetic_energy(cfg, s);
  for (int i = 0; i < 40; ++i) arm_step(cfg, s, {0, 0});
  EXPECT_NEAR(arm_kinetic_energy(cfg, s), e0, 2e-3 * e0);
  // The joints did move (both, since the links are coupled).
  EXPECT_GT(std::abs(s.q[1] - 1.1), 0.1);
  // Damping takes energy out.
  ArmConfig damped = cfg;
  damped.damping = 0.5;
  ArmState t;
  t.q = {0.3, 1.1};
  t.dq = {2.0, -1.5};
  for (int i = 0; i < 40; ++i) arm_step(damped, t, {0, 0});
  EXPECT_LT(arm_kinetic_energy(damped, t), 0.5 * e0);
}

TEST(Arm, HandIsAtTheEndOfTheLinks) {
  const ArmConfig cfg;
  ArmState s;
  s.q = {0, 0};
  auto p = arm_hand(cfg, s);
  EXPECT_NEAR(p[0], cfg.l1 + cfg.l2, 1e-12);
  EXPECT_NEAR(p[1], 0, 1e-12);
  s.q = {std::numbers::pi / 2, -std::numbers::pi / 2};
  p = arm_hand(cfg, s);
  EXPECT_NEAR(p[0], cfg.l2, 1e-12);
  EXPECT_NEAR(p[1], cfg.l1, 1e-12);
}

TEST(Arm, TheDemonstratorReachesItsTargets) {
  const ArmConfig cfg;
  const ArmEpisodes ep = arm_episodes(cfg, 300, 40, 11);
  std::vector<double> d = ep.final_distance;
  std::sort(d.begin(), d.end());
  EXPECT_LT(d[150], 0.03);  // median: within 3 cm after 2 s
  EXPECT_LT(d[270], 0.15);  // 90%; a few do not get there in 2 s
  for (float a : ep.actions) EXPECT_LE(std::abs(a), 1.0f);  // torques / tau_max, clipped
}

TEST(Arm, EpisodesAreTheSeedsAndShowWhatTheyClaim) {
  const ArmConfig cfg;
  const ArmEpisodes a = arm_episodes(cfg, 5, 12, 3), b = arm_episodes(cfg, 5, 12, 3),
                    c = arm_episodes(cfg, 5, 12, 4);
  EXPECT_EQ(a.inputs, b.inputs);
  EXPECT_EQ(a.actions, b.actions);
  EXPECT_NE(a.inputs, c.inputs);
  const double reach = cfg.l1 + cfg.l2;
  for (int64_t e = 0; e < a.n; ++e)
    for (int64_t t = 0; t < a.steps; ++t) {
      const float* in = a.inputs.data() + (e * a.steps + t) * kArmFeatures;
      // cos^2 + sin^2 of each joint; the hand from the angles.
      EXPECT_NEAR(in[0] * in[0] + in[1] * in[1], 1.0, 1e-5);
      EXPECT_NEAR(in[2] * in[2] + in[3] * in[3], 1.0, 1e-5);
      const double q1 = std::atan2(in[1], in[0]), q12 = q1 + std::atan2(in[3], in[2]);
      EXPECT_NEAR(in[4], (cfg.l1 * std::cos(q1) + cfg.l2 * std::cos(q12)) / reach, 1e-5);
      EXPECT_NEAR(in[5], (cfg.l1 * std::sin(q1) + cfg.l2 * std::sin(q12)) / reach, 1e-5);
      // The target stays; the previous torque is the last step's action (0 at the start).
      const float* first = a.inputs.data() + e * a.steps * kArmFeatures;
      EXPECT_EQ(in[6], first[6]);
      EXPECT_EQ(in[7], first[7]);
      for (int j = 0; j < 2; ++j) {
        const float prev = t == 0 ? 0.0f : a.actions[size_t((e * a.steps + t - 1) * kArmActions + j)];
        EXPECT_NEAR(in[8 + j], prev, 1e-6);
      }
    }
}

TEST(Arm, BadConfigsAreNamed) {
  ArmConfig cfg;
  cfg.l2 = 0;
  try {
    cfg.validate();
    ADD_FAILURE() << "a zero link length was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("data.arm.l2"), std::string::npos) << e.what();
  }
  cfg = {};
  cfg.substeps = 0;
  EXPECT_THROW(cfg.validate(), ConfigError);
  cfg = {};
  cfg.dt = std::nan("");
  EXPECT_THROW(cfg.validate(), ConfigError);
}

}  // namespace
}  // namespace sy
