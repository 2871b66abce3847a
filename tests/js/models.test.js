// Unit tests of the model picker's first choice (static/page/models.js), run by Node's test runner.
import assert from "node:assert/strict";
import { test } from "node:test";

import { preselectedModel } from "../../jarvis/static/page/models.js";

const models = [{ id: "small", owner: "gpu-a" }, { id: "big", owner: "gpu-b" }, { id: "tiny", owner: "gpu-a" }];

test("the model last used, while its upstream is up", () => {
  const upstreams = [{ name: "gpu-a", state: "up" }, { name: "gpu-b", state: "up" }];
  assert.equal(preselectedModel(models, upstreams, "big"), "big");
});

test("never a model whose upstream failed its last request: the first of one that is up", () => {
  for (const state of ["unreachable", "cooling_down"]) {
    const upstreams = [{ name: "gpu-a", state: "up" }, { name: "gpu-b", state }];
    assert.equal(preselectedModel(models, upstreams, "big"), "small");
  }
  const upstreams = [{ name: "gpu-a", state: "unreachable" }, { name: "gpu-b", state: "up" }];
  assert.equal(preselectedModel(models, upstreams, "small"), "big");
  assert.equal(preselectedModel(models, upstreams, null), "big");
});

test("a single backend, or every upstream down: the model last used, else the picker's first", () => {
  assert.equal(preselectedModel(models, [], "tiny"), "tiny");
  assert.equal(preselectedModel(models, [], "gone"), null);
  const down = [{ name: "gpu-a", state: "unreachable" }, { name: "gpu-b", state: "unreachable" }];
  assert.equal(preselectedModel(models, down, "big"), "big");
});
