// Drives ComfyUI's real frontend in headless Chromium (Debian's chromium, puppeteer-core from
// scripts/setup_browser.sh) the way a user does, for tests/test_comfy_browser.py:
//   for each workflow: drop the file onto the canvas, point the loaders at the demo models and make
//   the image small, exercise this pack's web extension (web/zimage.js), press the Run/Queue button,
//   wait until every SaveImage node shows its image, take a screenshot.
// It asserts nothing: it prints one JSON report (what the page showed) that the Python test checks.
//
//   node tests/frontend/browser_check.js CONFIG.json REPORT.json
// CONFIG: {url, artifacts, workflows: [paths], demo: {node type: {widget: value}}, width, height,
//          timeout_ms}
const puppeteer = require('puppeteer-core');
const fs = require('fs');
const path = require('path');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function dropWorkflow(page, file) {
  return page.evaluate(async (json, name) => {
    document.querySelectorAll('.p-toast-message').forEach((t) => t.remove());
    window.app.graph.clear();
    const dt = new DataTransfer();
    dt.items.add(new File([json], name, {type: 'application/json'}));
    document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    for (let i = 0; i < 100 && window.app.graph._nodes.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 500));
    return {
      loaded_nodes: window.app.graph._nodes.length,
      toasts: Array.from(document.querySelectorAll('.p-toast-message')).map((t) => t.innerText),
    };
  }, fs.readFileSync(file, 'utf8'), path.basename(file));
}

// In the page: change a widget as the canvas does when the user edits it (widget.setValue, which calls
// the widget's callback, where the frontend has it; else value + callback), read an input's shown label.
const PAGE_HELPERS = `
  window.__zi = {
    W: (n, name) => n.widgets?.find((w) => w.name === name),
    set(n, name, value) {
      const w = this.W(n, name);
      if (!w) return false;
      if (typeof w.setValue === 'function') w.setValue(value, {node: n, canvas: window.app.canvas});
      else { w.value = value; w.callback?.(value, window.app.canvas, n); }
      return true;
    },
    label(n, name) {
      const slot = n.inputs?.find((i) => i.name === name);
      return slot ? (slot.label || slot.localized_name || slot.name) : null;
    },
  };`;

// What a newcomer sees right after dropping the workflow, at 100 % zoom: for every widget the frontend
// draws as "label ... value" (drawTruncatingText, frontends >= 1.2x), whether both fit the node's width
// (the frontend's own test, with the arguments of its own call: otherwise it cuts the label and/or the
// value with an ellipsis), whether each node's title fits, and for every note whether its rendered text
// runs past the note's right edge.
async function layoutReport(page, screenshotPath) {
  return page.evaluate(async () => {
    const canvas = window.app.canvas;
    // Two animation frames (the frontend's DOM widgets follow the canvas in its own frame callbacks), but
    // never longer than half a second: a page that renders no frames must not hang the check.
    const frame = () => Promise.race([new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))),
      new Promise((r) => setTimeout(r, 500))]);
    const measured = new Map();
    const wrapped = [];
    for (const n of window.app.graph._nodes) {
      for (const w of n.widgets || []) {
        let p = Object.getPrototypeOf(w);
        while (p && !Object.prototype.hasOwnProperty.call(p, 'drawTruncatingText')) p = Object.getPrototypeOf(p);
        if (!p || wrapped.some(([q]) => q === p)) continue;
        const original = p.drawTruncatingText;
        const base = p.constructor;
        wrapped.push([p, original]);
        p.drawTruncatingText = function (args) {
          const {ctx, width, leftPadding = 5, rightPadding = 20} = args;
          const margin = base.margin ?? 15;
          const gap = base.labelValueGap ?? 5;
          const available = width - (margin * 2 + leftPadding) - 2 * margin - rightPadding;
          const label = String(this.displayName ?? this.label ?? this.name);
          const value = String(this._displayValue ?? this.value);
          const needed = ctx.measureText(label).width + gap + ctx.measureText(value).width;
          measured.set(this, {label, value, needed: Math.round(needed), available: Math.round(available),
            fits: needed <= available});
          return original.call(this, args);
        };
      }
    }
    const widgets = [];
    const notes = [];
    // Titles: the frontend cuts a title longer than the node's width less twice the title height
    // (LGraphNode.drawTitleText).
    const measure = document.createElement('canvas').getContext('2d');
    const titleHeight = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const titles = window.app.graph._nodes.filter((n) => n.titleFontStyle && n.getTitle).map((n) => {
      measure.font = n.titleFontStyle;
      const title = String(n.getTitle());
      const width = (n.renderingSize ?? n.size)[0];
      const needed = measure.measureText(title).width;
      const available = width - titleHeight * 2;
      return {node: n.id, type: n.type, title, needed: Math.round(needed), available: Math.round(available),
        fits: needed <= available};
    });
    window.__ziView = {scale: canvas.ds.scale, offset: [...canvas.ds.offset]};
    try {
      for (const n of window.app.graph._nodes) {
        canvas.ds.scale = 1;
        canvas.centerOnNode(n);
        canvas.setDirty(true, true);
        canvas.draw(true, true);
        await frame();
        for (const w of n.widgets || []) {
          const m = measured.get(w);
          if (m) widgets.push({node: n.id, type: n.type, name: w.name, node_width: Math.round(n.size[0]), ...m});
        }
        if (n.type === 'MarkdownNote' || n.type === 'Note') {
          const el = (n.widgets || []).map((w) => w.element || w.inputEl).find((e) => e);
          if (!el) { notes.push({node: n.id, found: false}); continue; }
          const box = el.getBoundingClientRect();
          let right = box.right;
          for (const d of el.querySelectorAll('*')) right = Math.max(right, d.getBoundingClientRect().right);
          notes.push({node: n.id, found: true, width: Math.round(box.width), scroll_width: el.scrollWidth,
            client_width: el.clientWidth, overflow_px: Math.round(right - box.right)});
        }
      }
    } finally {
      for (const [p, original] of wrapped) p.drawTruncatingText = original;
    }
    // The screenshot: the loaders and the note, at 100 %.
    const shown = window.app.graph._nodes.filter((n) => n.type.endsWith('Loader') || /Note$/.test(n.type));
    if (shown.length) {
      const x0 = Math.min(...shown.map((n) => n.pos[0])), x1 = Math.max(...shown.map((n) => n.pos[0] + n.size[0]));
      const y0 = Math.min(...shown.map((n) => n.pos[1])), y1 = Math.max(...shown.map((n) => n.pos[1] + n.size[1]));
      canvas.ds.scale = 1;
      canvas.ds.offset[0] = canvas.canvas.clientWidth / 2 - (x0 + x1) / 2;
      canvas.ds.offset[1] = canvas.canvas.clientHeight / 2 - (y0 + y1) / 2;
    }
    canvas.setDirty(true, true);
    await frame();
    return {widgets, notes, titles};
  }).then(async (report) => {
    await sleep(200);
    await page.screenshot({path: screenshotPath});
    await page.evaluate(() => {  // back to the view the drop gave (the run below expects every node drawn)
      const {scale, offset} = window.__ziView;
      window.app.canvas.ds.scale = scale;
      window.app.canvas.ds.offset[0] = offset[0];
      window.app.canvas.ds.offset[1] = offset[1];
      window.app.canvas.setDirty(true, true);
    });
    return {...report, screenshot: screenshotPath};
  });
}

// Loaders → demo files; every ZImageEmptyLatent: pick a preset and read width/height back, then
// preset custom at the test's small size.
async function prepare(page, demo, width, height) {
  return page.evaluate((demo, width, height) => {
    const {W} = window.__zi;
    const set = window.__zi.set.bind(window.__zi);
    for (const n of window.app.graph._nodes) {
      for (const [k, v] of Object.entries(demo[n.type] || {})) set(n, k, v);
    }
    const presets = [];
    for (const n of window.app.graph._nodes.filter((n) => n.type === 'ZImageEmptyLatent')) {
      const preset = W(n, 'preset').options.values.find((v) => /^1152x896/.test(v));
      const before = [W(n, 'width').value, W(n, 'height').value];
      set(n, 'preset', preset);
      presets.push({node: n.id, preset, before, width: W(n, 'width').value, height: W(n, 'height').value});
      set(n, 'preset', 'custom');
      set(n, 'width', width);
      set(n, 'height', height);
    }
    return presets;
  }, demo, width, height);
}

// Every ZImageTurboSampler: link a prompt to `negative` (if it has none) and read the input's label at
// guidance 0, at 1.5 and at 0 again. Leaves the first sampler linked at guidance 0, centred, for a
// screenshot; restoreNegative undoes the links.
async function checkNegative(page) {
  return page.evaluate(() => {
    const zi = window.__zi;
    const g = window.app.graph;
    const encoder = g._nodes.find((n) => ['ZImageTextEncode', 'CLIPTextEncode', 'TextEncodeZImageOmni'].includes(n.type));
    const records = [];
    for (const n of g._nodes.filter((n) => n.type === 'ZImageTurboSampler')) {
      const slot = n.inputs.findIndex((i) => i.name === 'negative');
      const record = {node: n.id, was_linked: n.inputs[slot].link != null, guidance: zi.W(n, 'guidance').value};
      if (!record.was_linked && encoder) encoder.connect(0, n, slot);
      record.linked = n.inputs[slot].link != null;
      zi.set(n, 'guidance', 0);
      record.guidance_0 = zi.label(n, 'negative');
      zi.set(n, 'guidance', 1.5);
      record.guidance_1_5 = zi.label(n, 'negative');
      zi.set(n, 'guidance', 0);
      record.guidance_0_again = zi.label(n, 'negative');
      records.push(record);
    }
    const first = g._nodes.find((n) => n.type === 'ZImageTurboSampler');
    if (first) {
      window.app.canvas.ds.scale = 1.2;
      window.app.canvas.centerOnNode(first);
    }
    g.setDirtyCanvas(true, true);
    return records;
  });
}

async function restoreNegative(page, records) {
  return page.evaluate((records) => {
    const zi = window.__zi;
    for (const r of records) {
      const n = window.app.graph.getNodeById(r.node);
      const slot = n.inputs.findIndex((i) => i.name === 'negative');
      if (!r.was_linked && n.inputs[slot].link != null) n.disconnectInput(slot);
      r.unlinked = zi.label(n, 'negative');
      zi.set(n, 'guidance', r.guidance);
    }
    return records;
  }, records);
}

async function clickQueue(page) {
  // The frontend's own button: "Run" in the action bar (frontends >= 1.2x), "Queue" / "Queue Prompt" in
  // older ones. The visible one is clicked with the mouse.
  const handle = await page.evaluateHandle(() => {
    const visible = (b) => { const r = b.getBoundingClientRect(); return r.width > 30 && r.height > 10; };
    const buttons = Array.from(document.querySelectorAll('button')).filter(visible);
    for (const text of ['Run', 'Queue', 'Queue Prompt']) {
      const b = buttons.find((b) => b.innerText.trim() === text);
      if (b) return b;
    }
    return null;
  });
  const element = handle.asElement();
  if (!element) throw new Error('no visible Run/Queue button in the page');
  // A transient overlay (the frontend's block-UI mask while a workflow loads) may cover it for a moment.
  let cover = null;
  for (let i = 0; i < 50; i++) {
    cover = await element.evaluate((b) => {
      const r = b.getBoundingClientRect();
      const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
      return b.contains(top) ? null : (top ? top.outerHTML.slice(0, 200) : 'nothing');
    });
    if (!cover) break;
    await sleep(200);
  }
  if (cover) throw new Error(`the Run/Queue button is covered by ${cover}`);
  const label = await element.evaluate((b) => b.innerText.trim());
  await element.click();
  return label;
}

async function waitForImages(page, timeoutMs) {
  const t0 = Date.now();
  for (;;) {
    const state = await page.evaluate(() => {
      const saves = window.app.graph._nodes.filter((n) => n.type === 'SaveImage');
      return {
        errors: window.__zimageErrors,
        finished_ms_ago: window.__zimageDone ? Date.now() - window.__zimageDone : null,
        images: saves.map((n) => ({node: n.id, images: (n.imgs || []).map((i) => ({
          src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))})),
      };
    });
    const done = state.images.length > 0 && state.images.every((s) => s.images.length > 0 &&
      s.images.every((i) => i.complete && i.width > 0));
    // The run ended (success or error) but an image is still not on its node after 10 s: report that.
    if (done || state.errors.length || state.finished_ms_ago > 10000) return state;
    if (Date.now() - t0 > timeoutMs) return {...state, timed_out: true};
    await sleep(250);
  }
}

// The text each node showed after the run (widgets, text areas, DOM text), for nodes that sent `text`
// in their UI output (e.g. ZImagePromptEnhancer).
async function shownTexts(page) {
  return page.evaluate(() => {
    const out = {};
    for (const [id, output] of Object.entries(window.__zimageExecuted)) {
      if (!output || !output.text) continue;
      const node = window.app.graph.getNodeById(Number(id));
      if (!node) continue;
      const shown = [];
      for (const w of node.widgets || []) {
        if (typeof w.value === 'string') shown.push(w.value);
        const el = w.element || w.inputEl;
        if (el) shown.push(el.value ?? '', el.innerText ?? '');
      }
      out[id] = {type: node.type, sent: output.text, shown};
    }
    return out;
  });
}

(async () => {
  const [configFile, reportFile] = process.argv.slice(2);
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  fs.mkdirSync(config.artifacts, {recursive: true});
  const browser = await puppeteer.launch({executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage']});
  const report = {workflows: {}, console_errors: []};
  try {
    const page = await browser.newPage();
    await page.setViewport({width: 1920, height: 1200});
    page.on('pageerror', (e) => report.console_errors.push(`pageerror: ${e.message}`));
    // A prompt the server refuses (validation) produces no execution events: record the answer.
    page.on('response', async (r) => {
      if (r.request().method() === 'POST' && /\/prompt$/.test(r.url()) && r.status() !== 200) {
        const body = await r.text().catch(() => '');
        await page.evaluate((e) => window.__zimageErrors && window.__zimageErrors.push(e),
          {rejected: r.status(), body: body.slice(0, 4000)}).catch(() => {});
      }
    });
    // A new user's first visit opens the template browser over the canvas: mark the tour as done first,
    // through the server's settings API (what the frontend stores when the user closes it).
    await fetch(`${config.url}/settings/Comfy.TutorialCompleted`, {method: 'POST', body: 'true'});
    await page.goto(config.url, {waitUntil: 'networkidle2', timeout: config.timeout_ms});
    await page.waitForFunction(() => window.app && window.app.graph && window.app.api, {timeout: config.timeout_ms});
    // Close what a first visit may still open over the canvas.
    for (let i = 0; i < 3 && await page.$('.p-dialog-mask, .p-dialog'); i++) {
      await page.keyboard.press('Escape');
      await sleep(300);
    }
    report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown');
    report.node_types = await page.evaluate(() => Object.keys(window.LiteGraph?.registered_node_types || {})
      .filter((t) => t.startsWith('ZImage')));
    await page.evaluate(PAGE_HELPERS);
    await page.evaluate(() => {
      window.__zimageErrors = [];
      window.__zimageExecuted = {};
      const api = window.app.api;
      api.addEventListener('executed', (e) => { window.__zimageExecuted[e.detail.node] = e.detail.output; });
      api.addEventListener('execution_error', (e) => window.__zimageErrors.push(e.detail));
      api.addEventListener('execution_success', () => { window.__zimageDone = Date.now(); });
      // Close what covers the canvas on a first visit (announcements), so screenshots show the graph.
      document.querySelectorAll('.p-toast-message').forEach((t) => t.remove());
    });
    for (const file of config.workflows) {
      const name = path.basename(file);
      const t0 = Date.now();
      console.log(`${name}: dropping`);
      const entry = await dropWorkflow(page, file);
      const stem = name.replace(/\.json$/, '');
      entry.layout = await layoutReport(page, path.join(config.artifacts, `${stem}.at-100-percent.png`));
      entry.presets = await prepare(page, config.demo, config.width, config.height);
      const negative = await checkNegative(page);
      if (negative.length) {
        await sleep(200);
        entry.negative_screenshot = path.join(config.artifacts, `${stem}.negative-label.png`);
        await page.screenshot({path: entry.negative_screenshot});
      }
      entry.negative = await restoreNegative(page, negative);
      await page.evaluate(() => { window.__zimageErrors.length = 0; window.__zimageExecuted = {}; window.__zimageDone = 0; });
      entry.button = await clickQueue(page);
      Object.assign(entry, await waitForImages(page, config.timeout_ms));
      entry.texts = await shownTexts(page);
      await page.evaluate(() => {
        const canvas = window.app.canvas;
        canvas.low_quality_zoom_threshold = 0;  // draw text at any zoom (the screenshot is a record)
        const cmd = window.app.extensionManager?.command;
        return cmd ? cmd.execute('Comfy.Canvas.FitView').catch(() => {}) : undefined;
      });
      await sleep(300);
      entry.screenshot = path.join(config.artifacts, `${stem}.png`);
      await page.screenshot({path: entry.screenshot});
      entry.seconds = (Date.now() - t0) / 1000;
      report.workflows[name] = entry;
      fs.writeFileSync(reportFile, JSON.stringify(report, null, 1) + '\n');
      console.log(`${name}: ${entry.seconds} s, errors ${JSON.stringify(entry.errors).slice(0, 300)}` +
        `${entry.timed_out ? ', TIMED OUT' : ''}`);
    }
  } finally {
    fs.writeFileSync(reportFile, JSON.stringify(report, null, 1) + '\n');
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
