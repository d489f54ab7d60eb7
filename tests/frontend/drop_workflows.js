// Loads the shipped UI workflows into ComfyUI's real frontend by drag and drop, in headless Chromium,
// and records what the frontend makes of them (node count, toasts such as schema-validation alerts,
// and its own graphToPrompt() API conversion). Not part of the CI suite (it needs Chromium); used to
// regenerate tests/frontend/frontend_api_prompts.json, which test_comfy_frontend.py compares against.
//
//   apt-get install chromium && npm install puppeteer-core@23
//   python main.py --cpu --port 8199 ... (with this pack in custom_nodes, any models)
//   node tests/frontend/drop_workflows.js http://127.0.0.1:8199 out.json workflows/*.json
const puppeteer = require('puppeteer-core');
const fs = require('fs');

(async () => {
  const [url, outFile, ...files] = process.argv.slice(2);
  const browser = await puppeteer.launch({executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: 'new', args: ['--no-sandbox', '--disable-gpu']});
  const page = await browser.newPage();
  await page.goto(url, {waitUntil: 'networkidle2', timeout: 120000});
  await page.waitForFunction(() => window.app && window.app.graph, {timeout: 120000});
  await new Promise((r) => setTimeout(r, 3000));
  const results = {};
  for (const file of files) {
    const name = file.split('/').pop();
    results[name] = await page.evaluate(async (json, name) => {
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
        prompt: prompt.output,
      };
    }, fs.readFileSync(file, 'utf8'), name);
  }
  fs.writeFileSync(outFile, JSON.stringify(results, null, 1));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
