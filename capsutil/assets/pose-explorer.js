/*
 * The pose explorer of chapter 06 (capsutil/assets/pose-explorer.js; the page side of
 * capsutil/explorer.py). Needs core.js.
 *
 * capsutil.poseExplorer.start(root) wires one explorer block: a digit chooser, one slider per
 * pose dimension that adds an offset to the digit's predicted capsule, a reset button, and a
 * canvas redrawn by running the decoder on every move. The block's payload (a JSON script in
 * it) carries the decoder's float16 weights and the digits' capsules; see explorer.py.
 */
(function () {
  "use strict";
  const capsutil = window.capsutil;
  if (capsutil.assets.includes("pose-explorer")) return;
  capsutil.assets.push("pose-explorer");
  const core = capsutil.core;

  function wire(root) {
    const spec = JSON.parse(root.querySelector('script[data-role="payload"]').textContent);
    const array = core.arrayReader(core.decodeBlob(spec.blob, spec.alphabet), spec.arrays);
    const E = spec.dims, side = spec.side, L = spec.layers;
    const weights = [], biases = [array("bias0")];
    for (let l = 1; l < L; l++) {
      weights.push(array("weight" + l));
      biases.push(array("bias" + l));
    }
    const decode = core.decoder(array("columns"), E, weights, biases);
    const poses = array("poses"), images = array("images");
    const slotOf = new Map(spec.classes.map((c, s) => [c, s]));
    const offsets = new Float32Array(E), pose = new Float32Array(E);
    const sliders = Array.from(root.querySelectorAll('input[type="range"][data-dimension]'));
    const digit = root.querySelector('[data-role="digit"]');
    const status = root.querySelector('[data-role="status"]');
    const input = root.querySelector('[data-role="input"]').getContext("2d");
    const output = root.querySelector('[data-role="reconstruction"]').getContext("2d");

    function render() {
      const i = Number(digit.value);
      let square = 0;
      for (let e = 0; e < E; e++) {
        pose[e] = poses[i * E + e] + offsets[e];                   // rounded to float32
        square += pose[e] * pose[e];
      }
      const pixels = decode(pose, slotOf.get(spec.labels[i]));
      core.paintGrey(output, side, k => Math.round(255 * (1 - pixels[k])));  // 1 is black
      status.textContent = "decoded as class " + spec.labels[i] + "; capsule length " +
        Math.sqrt(square).toFixed(3);
    }

    function showDigit() {
      const i = Number(digit.value);
      core.paintGrey(input, side, k => 255 - images[i * side * side + k]);
      render();
    }

    const readouts = sliders.map(slider => root.querySelector("#" + slider.id + "-value"));
    const show = (k, value) => {
      readouts[k].textContent = (value < 0 ? "" : "+") + value.toFixed(2);
    };
    sliders.forEach((slider, k) => slider.addEventListener("input", () => {
      offsets[Number(slider.dataset.dimension)] = Number(slider.value);
      show(k, Number(slider.value));
      render();
    }));
    digit.addEventListener("change", showDigit);
    root.querySelector('[data-role="reset"]').addEventListener("click", () => {
      sliders.forEach((slider, k) => {
        slider.value = 0;
        offsets[Number(slider.dataset.dimension)] = 0;
        show(k, 0);
      });
      render();
    });
    showDigit();
  }

  function start(root) {
    if (!root || root.dataset.ready) return;
    try {
      wire(root);
      root.dataset.ready = "true";
    } catch (failure) {
      root.querySelector('[data-role="status"]').textContent =
        "The explorer could not start: " + failure.message;
      root.dataset.ready = "failed";
      throw failure;
    }
  }

  capsutil.poseExplorer = {start};
})();
