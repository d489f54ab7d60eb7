// ComfyUI-ZImage frontend helpers:
//  * ZImageEmptyLatent: choosing a preset writes its size into the width/height widgets, so the
//    node shows the size that will be generated.
//  * ZImageTurboSampler: while guidance is 0 (Turbo's setting) a connected negative prompt has no
//    effect; its input is labelled so, instead of silently being ignored.
import { app } from "../../scripts/app.js";

const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);

function setupPresets(node) {
  const preset = findWidget(node, "preset");
  const width = findWidget(node, "width");
  const height = findWidget(node, "height");
  if (!preset || !width || !height) return;
  const apply = (value) => {
    const m = /^(\d+)x(\d+)/.exec(value ?? "");
    if (!m) return;
    width.value = Number(m[1]);
    height.value = Number(m[2]);
    node.setDirtyCanvas?.(true, true);
  };
  if (!node.__zimagePresets) {  // nodeCreated and loadedGraphNode both call this: wrap once
    node.__zimagePresets = true;
    const original = preset.callback;
    preset.callback = function (value, ...rest) {
      apply(value);
      return original?.call(this, value, ...rest);
    };
  }
  apply(preset.value);
}

function setupNegativeNotice(node) {
  const guidance = findWidget(node, "guidance");
  if (!guidance) return;
  const refresh = () => {
    const negative = node.inputs?.find((i) => i.name === "negative");
    if (!negative) return;
    const ignored = negative.link != null && Number(guidance.value) === 0;
    negative.label = ignored ? "negative (unused: guidance 0)" : undefined;
    node.setDirtyCanvas?.(true, true);
  };
  if (!node.__zimageNegative) {
    node.__zimageNegative = true;
    const original = guidance.callback;
    guidance.callback = function (value, ...rest) {
      const r = original?.call(this, value, ...rest);
      refresh();
      return r;
    };
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
      const r = onConnectionsChange?.apply(this, args);
      refresh();
      return r;
    };
  }
  refresh();
}

app.registerExtension({
  name: "ComfyUI-ZImage.helpers",
  async nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (type === "ZImageEmptyLatent") setupPresets(node);
    if (type === "ZImageTurboSampler") setupNegativeNotice(node);
  },
  async loadedGraphNode(node) {
    const type = node.comfyClass ?? node.type;
    if (type === "ZImageEmptyLatent") setupPresets(node);
    if (type === "ZImageTurboSampler") setupNegativeNotice(node);
  },
});
