// @ts-check
/**
 * Which model the picker shows first: the one last used, unless the upstream serving it failed its last
 * request (as /healthz says this worker saw it); then the first model of an upstream that is up.
 */

/**
 * @param {{id: string, owner: string}[]} models as /v1/models lists them (owner: the upstream's name)
 * @param {{name: string, state: string}[]} upstreams as /healthz lists them (none: a single backend)
 * @param {string | null} remembered the model last used on this browser
 * @returns {string | null} the model to pre-select; null: leave the picker's first
 */
export function preselectedModel(models, upstreams, remembered) {
  const down = new Set(upstreams.filter((upstream) => upstream.state !== "up").map((upstream) => upstream.name));
  const usable = (/** @type {{id: string, owner: string}} */ model) => !down.has(model.owner);
  const last = models.find((model) => model.id === remembered);
  if (last && usable(last)) return last.id;
  if (!down.size) return last ? last.id : null;
  return models.find(usable)?.id ?? (last ? last.id : null);
}
