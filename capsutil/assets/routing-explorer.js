/*
 * The routing explorer (capsutil/assets/routing-explorer.js; the page side of
 * capsutil/routing_explorer.py). Needs core.js.
 *
 * capsutil.routingExplorer.start(root) wires one explorer block: a digit chooser and an
 * iteration stepper (previous, next, and a range over T = 1..5). For the chosen digit it
 * computes the votes u_hat = W u once; for each T it routes them (core.route), decodes the
 * predicted capsule and draws the input beside the reconstruction, a heatmap of the couplings
 * to the predicted class over the grid of positions (the mean of the capsule maps at each
 * position), the mean coupling to each class and the capsule lengths. What it computed stays
 * on the block as root.routingState: {digit, iterations, predicted, couplings (I * J, the last
 * iteration's), lengths (J), pixels (P)}.
 */
(function () {
  "use strict";
  const capsutil = window.capsutil;
  if (capsutil.assets.includes("routing-explorer")) return;
  capsutil.assets.push("routing-explorer");
  const core = capsutil.core;
  const DARK = "#1f4e99", LIGHT = "#a9bfdf", INK = "#222";
  const FONT = "10px system-ui, sans-serif";

  // A canvas drawn at the screen's pixel density, data-width x data-height CSS pixels.
  function sharpCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Number(canvas.dataset.width), height = Number(canvas.dataset.height);
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.width = width + "px";
    const context = canvas.getContext("2d");
    context.scale(ratio, ratio);
    return {context, width, height};
  }

  // Diverging shades around the uniform coupling 1/J: white at t = 0, DARK towards t = 1 (above
  // uniform), orange towards t = -1 (below).
  function shade(t) {
    const k = Math.max(-1, Math.min(1, t));
    const ink = k >= 0 ? [224, 177, 102] : [25, 110, 200];
    return "rgb(" + ink.map(c => Math.round(255 - Math.abs(k) * c)).join(",") + ")";
  }

  // A bar's value label: `digits` decimals without the leading zero (".100"), so that ten
  // labels fit a narrow canvas.
  const barLabel = (value, digits) => value.toFixed(digits).replace(/^0(?=\.)/, "");

  // One bar per value on an axis from 0 to `top`, the value (`digits` decimals) above it and
  // its index below; bar `dark` dark, and a dashed line at `mark` when given. The labels'
  // font shrinks from 10 px when the widest would leave less than 6 px between neighbours.
  function drawBars({context, width, height}, values, dark, top, digits, mark) {
    const above = 16, below = 16, plot = height - above - below;
    const slot = width / values.length, bar = 0.64 * slot, y = v => above + plot * (1 - v / top);
    context.clearRect(0, 0, width, height);
    context.font = FONT;
    const widest = Math.max(...values.map(v => context.measureText(barLabel(v, digits)).width));
    context.font = Math.min(10, Math.floor(10 * (slot - 6) / widest)) + "px system-ui, sans-serif";
    context.textAlign = "center";
    context.textBaseline = "alphabetic";
    values.forEach((value, j) => {
      const x = j * slot + (slot - bar) / 2, level = y(Math.max(0, Math.min(top, value)));
      context.fillStyle = j === dark ? DARK : LIGHT;
      context.fillRect(x, level, bar, above + plot - level);
      context.fillStyle = INK;
      context.fillText(barLabel(value, digits), x + bar / 2, level - 3);
      context.fillText(String(j), x + bar / 2, height - 3);
    });
    context.fillRect(0, above + plot, width, 1);
    if (mark !== undefined) {
      context.setLineDash([3, 3]);
      context.strokeStyle = INK;
      context.beginPath();
      context.moveTo(0, y(mark));
      context.lineTo(width, y(mark));
      context.stroke();
      context.setLineDash([]);
    }
  }

  // grid x grid cells, row by row, each labelled with its value and shaded by its distance
  // from `middle` as a fraction of `span`.
  function drawHeatmap({context, width}, values, grid, middle, span) {
    const cell = width / grid;
    context.font = FONT;
    context.textAlign = "center";
    context.textBaseline = "middle";
    values.forEach((value, p) => {
      const t = (value - middle) / span, x = (p % grid) * cell, y = Math.floor(p / grid) * cell;
      context.fillStyle = shade(t);
      context.fillRect(x, y, cell, cell);
      context.fillStyle = Math.abs(t) > 0.55 ? "#fff" : INK;
      context.fillText(value.toFixed(3), x + cell / 2, y + cell / 2);
    });
  }

  function argmax(values) {
    let best = 0;
    for (let k = 1; k < values.length; k++) if (values[k] > values[best]) best = k;
    return best;
  }

  async function wire(root) {
    const part = role => root.querySelector('[data-role="' + role + '"]');
    const spec = JSON.parse(part("payload").textContent);
    const bytes = await core.unzip(core.decodeBlob(spec.blob, spec.alphabet));
    const array = core.arrayReader(bytes, spec.arrays);
    const [, I, D] = spec.arrays.u.shape, [, J, E] = spec.arrays.weight_codes.shape;
    const side = spec.side, maps = spec.maps, grid = Math.round(Math.sqrt(I / maps));
    const W = core.dequantize(array("weight_codes"), array("weight_scales"));
    const weights = [], biases = [array("bias0")];
    for (let l = 1; l < spec.layers; l++) {
      weights.push(core.dequantize(array("codes" + l), array("scales" + l)));
      biases.push(array("bias" + l));
    }
    const decode = core.decoder(array("columns"), E, weights, biases);
    const u = array("u"), images = array("images");
    const slotOf = new Map(spec.classes.map((c, s) => [c, s]));

    const digit = part("digit"), range = part("iterations"), readout = part("value");
    const previous = part("previous"), next = part("next"), status = part("status");
    const input = part("input").getContext("2d");
    const output = part("reconstruction").getContext("2d");
    const heatmap = sharpCanvas(part("heatmap")), couplingBars = sharpCanvas(part("couplings"));
    const lengthBars = sharpCanvas(part("lengths"));
    let uHat = null, voted = -1;

    function render() {
      const b = Number(digit.value), T = Number(range.value);
      if (b !== voted) {
        uHat = core.votes(W, u.subarray(b * I * D, (b + 1) * I * D), I, J, E, D);
        core.paintGrey(input, side, k => 255 - images[b * side * side + k]);
        voted = b;
      }
      const {couplings, poses} = core.route(uHat, I, J, E, T, spec.squash_eps);
      const lengths = core.lengths(poses, J, E, spec.length_eps);
      const c = argmax(lengths), slot = slotOf.get(c);
      const mean = new Float64Array(J), heat = new Float64Array(grid * grid);
      for (let i = 0; i < I; i++) {
        for (let j = 0; j < J; j++) mean[j] += couplings[i * J + j] / I;
        heat[i % (grid * grid)] += couplings[i * J + c] / maps;    // i = map * grid^2 + position
      }
      let pixels = null;
      if (slot !== undefined) {
        const pose = Float32Array.from(poses.subarray(c * E, (c + 1) * E));    // as float32
        pixels = Float32Array.from(decode(pose, slot));
        core.paintGrey(output, side, k => Math.round(255 * (1 - pixels[k])));   // 1 is black
      }
      drawHeatmap(heatmap, Array.from(heat), grid, 1 / J, 0.5 / J);
      drawBars(couplingBars, Array.from(mean), c, 2 / J, 3, 1 / J);
      drawBars(lengthBars, Array.from(lengths), c, 1, 2);
      readout.textContent = "T = " + T;
      previous.disabled = T <= 1;
      next.disabled = T >= Number(range.max);
      part("reconstruction-caption").textContent = "reconstruction from capsule " + c;
      part("heatmap-caption").textContent = "mean coupling to class " + c + " at each of the " +
        grid + " \u00d7 " + grid + " positions (over the " + maps + " maps): white is the " +
        "uniform 1/" + J + ", blue " + (1.5 / J).toFixed(2) + " or more, orange " +
        (0.5 / J).toFixed(2) + " or less";
      status.textContent = slot === undefined ? "The page carries no decoder for class " + c :
        "T = " + T + ": class " + c + " is predicted, with length " + lengths[c].toFixed(3);
      root.routingState = {digit: b, iterations: T, predicted: c, couplings, lengths, pixels};
    }

    const step = delta => {
      range.value = Math.min(Number(range.max), Math.max(1, Number(range.value) + delta));
      render();
    };
    range.addEventListener("input", render);
    digit.addEventListener("change", render);
    previous.addEventListener("click", () => step(-1));
    next.addEventListener("click", () => step(1));
    render();
  }

  function start(root) {
    if (!root || root.dataset.started) return;
    root.dataset.started = "true";
    wire(root).then(() => {
      root.dataset.ready = "true";
    }, failure => {
      root.querySelector('[data-role="status"]').textContent =
        "The explorer could not start: " + failure.message;
      root.dataset.ready = "failed";
      throw failure;
    });
  }

  capsutil.routingExplorer = {start};
})();
