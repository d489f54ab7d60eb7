// Loads the shipped UI workflows into ComfyUI's real frontend by drag and drop, in headless Chromium,
// and records what the frontend makes of them (node count, toasts such as schema-validation alerts,
// and its own graphToPrompt() API conversion). Not part of the CI suite (it needs Chromium); used to
// regenerate tests/frontend/frontend_api_prompts.json, which test_comfy_frontend.py compares against.
// It writes that file's format directly ({source, workflows: {name: {loaded_nodes, toasts, prompt}}},
// prompt nodes as {class_type, inputs}); node types, open dialogs and browser console errors of each
// drop are printed to stdout for review (they are not recorded).
//
//   apt-get install chromium && npm install puppeteer-core@23   (NODE_PATH=<that folder>/node_modules)
//   python main.py --cpu --port 8199 ... (with this pack in custom_nodes, any models)
//   node tests/frontend/drop_workflows.js http://127.0.0.1:8199 tests/frontend/frontend_api_prompts.json workflows/*.json
const puppeteer = require('puppeteer-core');
const fs = require('fs');

(async () => {
  const [url, outFile, ...files] = process.argv.slice(2);
  const browser = await puppeteer.launch({executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: 'new', args: ['--no-sandbox', '--disable-gpu']});
  const page = await browser.newPage();
  let errors = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  await page.goto(url, {waitUntil: 'networkidle2', timeout: 120000});
  await page.waitForFunction(() => window.app && window.app.graph, {timeout: 120000});
  await new Promise((r) => setTimeout(r, 3000));
  const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown');
  if (errors.length) console.log(`errors while the frontend started:\n  ${errors.join('\n  ')}`);
  const workflows = {};
  for (const file of files) {
    const name = file.split('/').pop();
    errors = [];
    const r = await page.evaluate(async (json, name) => {
      document.querySelectorAll('.p-toast-message').forEach((t) => t.remove());
      window.app.graph.clear();
      const dt = new DataTransfer();
      dt.items.add(new File([json], name, {type: 'application/json'}));
      document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
      await new Promise((r) => setTimeout(r, 2500));
      const prompt = await window.app.graphToPrompt();
      return {
        count: window.app.graph._nodes.length,
        types: window.app.graph._nodes.map((n) => n.type),
        toasts: Array.from(document.querySelectorAll('.p-toast-message')).map((t) => t.innerText),
        dialogs: Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText),
        prompt: prompt.output,
      };
    }, fs.readFileSync(file, 'utf8'), name);
    const prompt = {};
    for (const [id, n] of Object.entries(r.prompt)) prompt[id] = {class_type: n.class_type, inputs: n.inputs};
    workflows[name] = {loaded_nodes: r.count, toasts: r.toasts, prompt};
    console.log(`${name}: ${r.count} nodes [${r.types.join(', ')}]; toasts ${JSON.stringify(r.toasts)}; ` +
      `dialogs ${JSON.stringify(r.dialogs)}; browser errors ${JSON.stringify(errors)}`);
  }
  const source = `ComfyUI frontend ${version} (comfyui_frontend_package) in headless Chromium: each workflow ` +
    'dropped onto the canvas, then app.graphToPrompt(); regenerate with tests/frontend/drop_workflows.js';
  fs.writeFileSync(outFile, JSON.stringify({source, workflows}, null, 1) + '\n');
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
