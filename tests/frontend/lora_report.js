// Runs workflows/z_image_turbo_two_loras.json in ComfyUI's real frontend (headless Chromium) and records
// what the ZImageLoraLoader nodes show after the run: web/zimage.js puts each node's report (its UI output
// {"text": [...]}) into a read-only text box on the node. Writes the recorded text and a screenshot.
// Not part of the CI suite (it needs Chromium); tests/test_comfy_lora.py checks the recording.
//
//   apt-get install chromium && npm install puppeteer-core@23   (NODE_PATH=<that folder>/node_modules)
//   python main.py --cpu --port 8199 ... (this pack in custom_nodes; the test harness's demo models)
//   node tests/frontend/lora_report.js http://127.0.0.1:8199 tests/frontend/lora_report_ui.json LORA1 LORA2 \
//        DIT TEXT_ENCODER VAE [screenshot.png]
const puppeteer = require('puppeteer-core');
const fs = require('fs');

(async () => {
  const [url, outFile, lora1, lora2, dit, te, vae, shot] = process.argv.slice(2);
  const browser = await puppeteer.launch({executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: 'new', args: ['--no-sandbox', '--disable-gpu', '--window-size=1800,1000']});
  const page = await browser.newPage();
  await page.setViewport({width: 1800, height: 1000});
  const errors = [];
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  await page.goto(url, {waitUntil: 'networkidle2', timeout: 120000});
  await page.waitForFunction(() => window.app && window.app.graph, {timeout: 120000});
  await new Promise((r) => setTimeout(r, 3000));
  const workflow = fs.readFileSync('workflows/z_image_turbo_two_loras.json', 'utf8');
  await page.evaluate(async (json, names) => {
    await window.app.loadGraphData(JSON.parse(json));
    const set = (node, name, value) => { const w = node.widgets.find((x) => x.name === name); w.value = value; };
    const loras = window.app.graph._nodes.filter((n) => n.type === 'ZImageLoraLoader').sort((a, b) => a.id - b.id);
    set(loras[0], 'lora_name', names.lora1);
    set(loras[1], 'lora_name', names.lora2);
    for (const n of window.app.graph._nodes) {
      if (n.type === 'ZImageModelLoader') set(n, 'model_name', names.dit);
      if (n.type === 'ZImageTextEncoderLoader') set(n, 'text_encoder_name', names.te);
      if (n.type === 'ZImageVAELoader') set(n, 'vae_name', names.vae);
      if (n.type === 'ZImageEmptyLatent') { set(n, 'preset', 'custom'); set(n, 'width', 64); set(n, 'height', 64); }
    }
  }, workflow, {lora1, lora2, dit, te, vae});
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  // Done when both LoRA nodes show a report (the extension adds the text box on the node's "executed" message).
  await page.waitForFunction(() => window.app.graph._nodes.filter((n) => n.type === 'ZImageLoraLoader')
    .every((n) => (n.widgets || []).some((w) => w.name === 'lora_report' && w.value)), {timeout: 300000});
  await new Promise((r) => setTimeout(r, 1000));
  const shown = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.type === 'ZImageLoraLoader')
    .sort((a, b) => a.id - b.id).map((n) => {
      const w = n.widgets.find((x) => x.name === 'lora_report');
      return {node: n.id, lora_name: n.widgets.find((x) => x.name === 'lora_name').value, widget_text: w.value,
        text_box: w.inputEl ? w.inputEl.value : null, text_box_visible: !!(w.inputEl && w.inputEl.offsetParent),
        read_only: !!(w.inputEl && w.inputEl.readOnly)};
    }));
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  const sent = Object.values(prompt).filter((n) => n.class_type === 'ZImageLoraLoader').map((n) => Object.keys(n.inputs));
  if (shot) {  // the two LoRA nodes in view, no dialog in front
    await page.keyboard.press('Escape');
    await page.evaluate(() => {
      document.querySelectorAll('.p-dialog-mask, .p-dialog').forEach((d) => d.remove());
      window.app.canvas.ds.scale = 1.0;
      window.app.canvas.ds.offset = [-300, 60];
      window.app.canvas.setDirty(true, true);
    });
    await new Promise((r) => setTimeout(r, 1000));
    await page.screenshot({path: shot});
  }
  const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown');
  const source = `ComfyUI frontend ${version} in headless Chromium: workflows/z_image_turbo_two_loras.json queued ` +
    'with the demo files, then the text shown on each ZImageLoraLoader; regenerate with tests/frontend/lora_report.js';
  fs.writeFileSync(outFile, JSON.stringify({source, nodes: shown, prompt_inputs: sent, page_errors: errors}, null, 1) + '\n');
  console.log(JSON.stringify({shown, sent, errors}, null, 1));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
