// ComfyUI-ZImage frontend helpers:
//  * ZImageEmptyLatent: choosing a preset writes its size into the width/height widgets, so the
//    node shows the size that will be generated.
//  * ZImageTurboSampler: while guidance is 0 (Turbo's setting) a connected negative prompt has no
//    effect; its input is labelled so, instead of silently being ignored.
//  * ZImageTurboSampler / ZImageImg2ImgSampler: choosing a preset ("… (30 steps, shift 6, CFG 4)") writes its
//    steps, shift and guidance into those widgets, so the node shows what will run.
//  * ZImageLoraLoader: after a run the node shows its report (what the LoRA matched, what it did not);
//    ZImageControlNetLoader shows the same way which layout (and model family) it detected.
//  * ZImagePromptEnhancer: the text it generated is shown on the node, in a read-only multiline widget
//    named "enhanced_prompt" (a <textarea class="zimage-enhanced-prompt">), filled from the executed
//    message's ui.text[0] (plus "Negative prompt: ..." from ui.negative_prompt[0] in quality-boost mode).
//    The widget is neither saved in the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);
const REPORT_WIDGET = "lora_report";

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

// "<name> (<N> steps, shift <S>, CFG <G>|no CFG)" → the widget values the server-side preset uses.
function samplerPresetValues(value) {
  const steps = /(\d+) steps/.exec(value ?? "");
  const shift = /shift ([\d.]+)/.exec(value ?? "");
  if (!steps || !shift) return null;
  const cfg = /CFG ([\d.]+)/.exec(value);
  return { steps: Number(steps[1]), shift: Number(shift[1]), guidance: cfg ? Number(cfg[1]) : 0 };
}

function setupSamplerPresets(node) {
  const preset = findWidget(node, "preset");
  if (!preset) return;
  const apply = (value) => {
    const values = samplerPresetValues(value);
    if (!values) return;
    for (const [name, v] of Object.entries(values)) {
      const widget = findWidget(node, name);
      if (widget) {
        widget.value = v;
        widget.callback?.(v);
      }
    }
    node.setDirtyCanvas?.(true, true);
  };
  if (!node.__zimageSamplerPresets) {
    node.__zimageSamplerPresets = true;
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

// ZImageLoraLoader: after a run, the LoRA's report (keys matched / not matched, modules, rank, scale)
// is shown in a read-only text box on the node. The node sends it as its UI output {"text": [report]}.
function showLoraReport(node, text) {
  let widget = findWidget(node, REPORT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;  // display only: not saved in the workflow, not sent with the prompt
    widget.options = { ...(widget.options ?? {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
      widget.inputEl.style.fontFamily = "monospace";
      widget.inputEl.style.fontSize = "10px";
    }
  }
  widget.value = text;
  if (widget.inputEl) widget.inputEl.value = text;
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size[0], 420), Math.max(node.size[1], size[1], 260)]);
  node.setDirtyCanvas?.(true, true);
}

function setupLoraReport(node) {
  if (node.__zimageLoraReport) return;
  node.__zimageLoraReport = true;
  const onExecuted = node.onExecuted;
  node.onExecuted = function (message) {
    const r = onExecuted?.apply(this, arguments);
    const text = message?.text;
    if (text?.length) showLoraReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    return r;
  };
}

const ENHANCED = "enhanced_prompt";

function setupEnhancerDisplay(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function (...args) {
    const r = onNodeCreated?.apply(this, args);
    const widget = ComfyWidgets.STRING(this, ENHANCED, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not stored in the workflow's widgets_values
    widget.options ??= {};
    widget.options.serialize = false; // not sent with the prompt
    widget.options.read_only = true;
    const el = widget.inputEl ?? widget.element;
    if (el) {
      el.readOnly = true;
      el.placeholder = "The enhanced prompt appears here after the node runs.";
      el.classList?.add("zimage-enhanced-prompt");
    }
    return r;
  };
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message, ...rest) {
    const r = onExecuted?.apply(this, [message, ...rest]);
    const widget = findWidget(this, ENHANCED);
    if (widget) {
      const text = message?.text?.[0] ?? "";
      const negative = message?.negative_prompt?.[0];
      widget.value = negative ? `${text}\n\nNegative prompt: ${negative}` : text;
      this.setDirtyCanvas?.(true, true);
    }
    return r;
  };
}

app.registerExtension({
  name: "ComfyUI-ZImage.helpers",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === "ZImagePromptEnhancer") setupEnhancerDisplay(nodeType);
  },
  async nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (type === "ZImageEmptyLatent") setupPresets(node);
    if (type === "ZImageTurboSampler") setupNegativeNotice(node);
    if (type === "ZImageTurboSampler" || type === "ZImageImg2ImgSampler") setupSamplerPresets(node);
    if (type === "ZImageLoraLoader" || type === "ZImageControlNetLoader") setupLoraReport(node);
  },
  async loadedGraphNode(node) {
    const type = node.comfyClass ?? node.type;
    if (type === "ZImageEmptyLatent") setupPresets(node);
    if (type === "ZImageTurboSampler") setupNegativeNotice(node);
    if (type === "ZImageTurboSampler" || type === "ZImageImg2ImgSampler") setupSamplerPresets(node);
    if (type === "ZImageLoraLoader" || type === "ZImageControlNetLoader") setupLoraReport(node);
  },
});
