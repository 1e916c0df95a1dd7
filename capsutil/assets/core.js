/*
 * The numerical core of the book's explorers (capsutil/assets/core.js).
 *
 * Every explorer block inlines this file, so a block works on its own: offline, from file://
 * and in Jupyter. The guard below runs it once per page however many blocks carry it, and
 * window.capsutil.assets lists the asset files that have run, in order.
 *
 * window.capsutil.core holds
 *   decodeBlob(text, alphabet)   base64 over the payload's own 64 symbols -> Uint8Array
 *   unzip(bytes)                 a zlib ("deflate") stream -> Promise of Uint8Array
 *   arrayReader(bytes, arrays)   name -> typed array, from the payload's manifest of arrays
 *   dequantize(codes, scales)    int8 codes times one scale per group of consecutive codes
 *   affine(W, b, x, out)         out = W x + b for a row-major W (out.length, x.length)
 *   decoder(columns, E, weights, biases)   the CapsNet decoder: (capsule, class slot) -> pixels
 *   votes(W, u, I, J, E, D)      u_hat[i, j, :] = W[i, j] u[i]
 *   route(uHat, I, J, E, iterations, eps)  routing by agreement -> couplings and parent poses
 *   lengths(v, J, E, eps)        capsule lengths sqrt(|v_j|^2 + eps)
 *   paintGrey(context, side, grey)         a side x side image, grey(k) in 0..255 for pixel k
 *
 * Index letters as in capsutil/routing.py: i child capsule, j parent capsule, d child pose
 * component, e parent pose component. Arrays are flat and row-major, last index fastest.
 */
(function () {
  "use strict";
  const capsutil = window.capsutil = window.capsutil || {};
  capsutil.assets = capsutil.assets || [];
  if (capsutil.assets.includes("core")) return;
  capsutil.assets.push("core");

  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * fraction * Math.pow(2, -24);
    if (exponent === 31) return fraction ? 0 / 0 : sign / 0;           // not finite
    return sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
  }

  let halves = null;                          // every float16 bit pattern as a float, on demand
  function halfTable() {
    if (!halves) {
      halves = new Float32Array(65536);
      for (let h = 0; h < 65536; h++) halves[h] = halfToFloat(h);
    }
    return halves;
  }

  function decodeBlob(text, alphabet) {
    const value = new Uint8Array(128);
    for (let k = 0; k < 64; k++) value[alphabet.charCodeAt(k)] = k;
    const padding = text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0;
    const bytes = new Uint8Array(text.length / 4 * 3 - padding);
    for (let i = 0, o = 0; i < text.length; i += 4) {
      const bits = value[text.charCodeAt(i)] << 18 | value[text.charCodeAt(i + 1)] << 12 |
        value[text.charCodeAt(i + 2)] << 6 | value[text.charCodeAt(i + 3)];
      bytes[o++] = bits >> 16;
      if (o < bytes.length) bytes[o++] = (bits >> 8) & 255;
      if (o < bytes.length) bytes[o++] = bits & 255;
    }
    return bytes;
  }

  function unzip(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(buffer => new Uint8Array(buffer));
  }

  // Each manifest entry is {dtype, shape, offset}; offsets count bytes from the blob's start.
  // float16 and float32 arrays become Float32Array, int8 Int8Array and uint8 Uint8Array.
  function arrayReader(bytes, arrays) {
    const data = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return name => {
      const entry = arrays[name], at = entry.offset;
      const n = entry.shape.reduce((a, b) => a * b, 1);
      if (entry.dtype === "uint8") return bytes.subarray(at, at + n);
      if (entry.dtype === "int8") return new Int8Array(bytes.buffer, bytes.byteOffset + at, n);
      const out = new Float32Array(n);
      if (entry.dtype === "float16") {
        const table = halfTable();
        for (let k = 0; k < n; k++) out[k] = table[data.getUint16(at + 2 * k, true)];
      } else {
        for (let k = 0; k < n; k++) out[k] = data.getFloat32(at + 4 * k, true);
      }
      return out;
    };
  }

  function dequantize(codes, scales) {
    const group = codes.length / scales.length, out = new Float32Array(codes.length);
    for (let g = 0, k = 0; g < scales.length; g++) {
      const scale = scales[g];
      for (let end = k + group; k < end; k++) out[k] = codes[k] * scale;
    }
    return out;
  }

  // Each dot product is summed in double precision and stored in out's own type.
  function affine(W, b, x, out) {
    const cols = x.length;
    for (let r = 0; r < out.length; r++) {
      let acc = b[r];
      for (let k = 0, at = r * cols; k < cols; k++) acc += W[at + k] * x[k];
      out[r] = acc;
    }
    return out;
  }

  // Linear, (ReLU, Linear)*, Sigmoid on the capsule v (E,) of class slot s. The first layer
  // carries only the E columns that each class's capsule multiplies: columns (C, H1, E);
  // weights[l] (n_(l+1), n_l) are the later layers, biases[l] (n_l) every layer's. Activations
  // are kept in float32 (Float32Array), like PyTorch's.
  function decoder(columns, E, weights, biases) {
    const sizes = biases.map(b => b.length), H1 = sizes[0], last = sizes.length - 1;
    const activations = sizes.map(n => new Float32Array(n));
    const relu = x => { for (let k = 0; k < x.length; k++) if (x[k] < 0) x[k] = 0; };
    return (v, s) => {
      affine(columns.subarray(s * H1 * E, (s + 1) * H1 * E), biases[0], v, activations[0]);
      for (let l = 1; l <= last; l++) {
        relu(activations[l - 1]);
        affine(weights[l - 1], biases[l], activations[l - 1], activations[l]);
      }
      const out = activations[last];
      for (let k = 0; k < out.length; k++) out[k] = 1 / (1 + Math.exp(-out[k]));
      return out;
    };
  }

  function votes(W, u, I, J, E, D) {
    const uHat = new Float64Array(I * J * E);
    for (let i = 0; i < I; i++) {
      for (let row = i * J * E; row < (i + 1) * J * E; row++) {
        let acc = 0;
        for (let d = 0; d < D; d++) acc += W[row * D + d] * u[i * D + d];
        uHat[row] = acc;
      }
    }
    return uHat;
  }

  // squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) for each of the J capsules of s.
  function squash(s, J, E, eps) {
    for (let j = 0; j < J; j++) {
      let square = 0;
      for (let e = 0; e < E; e++) square += s[j * E + e] * s[j * E + e];
      const factor = square / ((1 + square) * Math.sqrt(square + eps));
      for (let e = 0; e < E; e++) s[j * E + e] *= factor;
    }
    return s;
  }

  // Sabour et al. (2017), Procedure 1, as capsutil.routing.dynamic_routing computes it: logits
  // b_ij start at 0; each iteration c_ij = softmax_j(b_ij), s_j = sum_i c_ij u_hat_ij,
  // v_j = squash(s_j), and every iteration but the last adds u_hat_ij . v_j to b_ij.
  // Returns the couplings c (I, J) of the last iteration and the parents' poses v (J, E).
  function route(uHat, I, J, E, iterations, eps) {
    const logits = new Float64Array(I * J), c = new Float64Array(I * J);
    const v = new Float64Array(J * E);
    for (let t = 0; t < iterations; t++) {
      for (let i = 0; i < I; i++) {
        let top = logits[i * J], total = 0;
        for (let j = 1; j < J; j++) top = Math.max(top, logits[i * J + j]);
        for (let j = 0; j < J; j++) total += (c[i * J + j] = Math.exp(logits[i * J + j] - top));
        for (let j = 0; j < J; j++) c[i * J + j] /= total;
      }
      v.fill(0);
      for (let i = 0; i < I; i++) {
        for (let j = 0; j < J; j++) {
          const weight = c[i * J + j], at = (i * J + j) * E;
          for (let e = 0; e < E; e++) v[j * E + e] += weight * uHat[at + e];
        }
      }
      squash(v, J, E, eps);
      if (t === iterations - 1) break;
      for (let i = 0; i < I; i++) {
        for (let j = 0; j < J; j++) {
          let agreement = 0;
          const at = (i * J + j) * E;
          for (let e = 0; e < E; e++) agreement += uHat[at + e] * v[j * E + e];
          logits[i * J + j] += agreement;
        }
      }
    }
    return {couplings: c, poses: v};
  }

  function lengths(v, J, E, eps) {
    const out = new Float64Array(J);
    for (let j = 0; j < J; j++) {
      let square = 0;
      for (let e = 0; e < E; e++) square += v[j * E + e] * v[j * E + e];
      out[j] = Math.sqrt(square + eps);
    }
    return out;
  }

  function paintGrey(context, side, grey) {
    const image = context.createImageData(side, side);
    for (let k = 0; k < side * side; k++) {
      image.data[4 * k] = image.data[4 * k + 1] = image.data[4 * k + 2] = grey(k);
      image.data[4 * k + 3] = 255;
    }
    context.putImageData(image, 0, 0);
  }

  capsutil.core = {
    decodeBlob, unzip, arrayReader, dequantize, affine, decoder, votes, route, lengths,
    paintGrey,
  };
})();
