"""The web page (gradio Blocks): text -> image with the decoding controls,
the retrieved documents and the `cm3leon generate` command that reproduces
the samples; image -> text; editing for fine-tuned models. It calls the same
ModelServer as the HTTP API, so page requests batch with API requests."""
from __future__ import annotations

import base64
import io
import time

import numpy as np

from cm3leon_jax.serve import requests as req_lib
from cm3leon_jax.serve.batcher import QueueFull

TITLE = "CM3Leon (cm3leon_jax)"


def _pil(png_b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(png_b64)))


def _png_b64(image: np.ndarray) -> str:
    return req_lib.png_base64(np.asarray(image, np.uint8)[..., :3])


def build(server):
    """The gr.Blocks of `server` (a ModelServer)."""
    import gradio as gr

    defaults = req_lib.Decoding()

    def fail(e: Exception):
        raise gr.Error(str(e), print_exception=False)

    def text_to_image(prompt, num_samples, decoding, cfg_scale, top_p, temperature, num_retrieved, seed,
                      progress=gr.Progress()):
        try:
            body = {"prompt": prompt, "num_samples": num_samples, "decoding": decoding, "cfg_scale": cfg_scale,
                    "top_p": top_p, "temperature": temperature, "num_retrieved": num_retrieved,
                    "seed": seed if seed is not None else 0}
            r = req_lib.generate_request({k: (int(v) if k in ("num_samples", "num_retrieved", "seed") and
                                              isinstance(v, float) and v.is_integer() else v)
                                          for k, v in body.items()}, server.max_retrieved)
            server.check_prompt(r)
            t = time.time()
            future = server.submit_generate(r)
            while not future.done():
                waited = time.time() - t
                what = "decoding" if future.running() else f"queued ({server.batcher.pending()} waiting)"
                progress(None, desc=f"{what}: {waited:.0f}s")
                time.sleep(0.25)
            imgs, _, retrieved = future.result()
            out = server.generate_response(r, imgs, retrieved, time.time() - t)
        except (req_lib.RequestError, QueueFull, ValueError) as e:
            fail(e)
        samples = [(_pil(s["png"]), f"#{s['rank'] + 1} {s['decoding']}" +
                    (f", CLIP {s['clip_score']:.3f}" if s["clip_score"] is not None else ""))
                   for s in out["samples"]]
        docs = [(_pil(d["png"]), f"{d['caption']} (score {d['score']:.3f})") for d in out["retrieved"] if d["png"]]
        status = (f"{len(samples)} samples in {out['seconds']:.1f}s, ordered by CLIP score"
                  if server.has_clip else f"{len(samples)} samples in {out['seconds']:.1f}s (no CLIP: not reranked)")
        return samples, docs, out["command"], status

    def image_to_text(image, question, seed):
        if image is None:
            fail(ValueError("upload an image first"))
        try:
            body = {"image": _png_b64(image), "prompt": question or "", "seed": int(seed or 0)}
            return server.describe(req_lib.describe_request(body, server.g.vq.resolution))["text"]
        except (req_lib.RequestError, ValueError) as e:
            fail(e)

    def edit(image, instruction, cfg_scale, image_cfg_scale, num_samples, seed):
        if image is None:
            fail(ValueError("upload an image first"))
        try:
            body = {"image": _png_b64(image), "prompt": instruction, "cfg_scale": cfg_scale,
                    "image_cfg_scale": image_cfg_scale, "num_samples": int(num_samples), "seed": int(seed or 0)}
            out = server.edit(req_lib.edit_request(body, server.g.vq.resolution))
        except (req_lib.RequestError, ValueError) as e:
            fail(e)
        return [_pil(p) for p in out["images"]]

    info = server.info()
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE}\nModel `{info['model_dir']}`, step {info['step']}"
                    + (" (fine-tuned)" if info["fine_tuned"] else ""))
        with gr.Tab("Text → image"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                        placeholder="a small red circle above a large blue square")
                    num_samples = gr.Slider(1, req_lib.MAX_SAMPLES, value=4, step=1, label="Samples",
                                            elem_id="num_samples")
                    decoding = gr.Radio(list(req_lib.DECODINGS), value=defaults.decoding, label="Decoding",
                                        elem_id="decoding",
                                        info="mixed: one sample by contrastive decoding (CD-K), the others top-p")
                    cfg_scale = gr.Slider(1.0, 10.0, value=defaults.cfg_scale, step=0.5,
                                          label="Guidance scale (CFG)", elem_id="cfg_scale")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top-p", elem_id="top_p")
                    temperature = gr.Slider(0.1, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                            elem_id="temperature")
                    num_retrieved = gr.Slider(0, max(info["max_retrieved"], 1), value=min(2, info["max_retrieved"]),
                                              step=1, label="Retrieved documents", elem_id="num_retrieved",
                                              interactive=info["max_retrieved"] > 0)
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    examples = server.example_prompts()
                    if examples:
                        gr.Examples([[p] for p in examples], inputs=[prompt], label="Held-out captions")
                with gr.Column(scale=2):
                    status = gr.Markdown(elem_id="status")
                    samples = gr.Gallery(label="Samples (best CLIP score first)", columns=4, height="auto",
                                         elem_id="samples")
                    retrieved = gr.Gallery(label="Retrieved documents", columns=4, height=240, object_fit="contain",
                                           elem_id="retrieved")
                    command = gr.Textbox(label="Reproduce with", elem_id="command", interactive=False,
                                         buttons=["copy"])
            go.click(text_to_image, [prompt, num_samples, decoding, cfg_scale, top_p, temperature, num_retrieved,
                                     seed], [samples, retrieved, command, status], concurrency_limit=None)
        with gr.Tab("Image → text"):
            with gr.Row():
                image = gr.Image(label="Image", type="numpy", elem_id="describe_image")
                with gr.Column():
                    question = gr.Textbox(label="Question (empty: a caption)", elem_id="question",
                                          placeholder="Question: what shape is the red one?")
                    dseed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    ask = gr.Button("Describe", variant="primary", elem_id="describe")
                    answer = gr.Textbox(label="Text", elem_id="answer", interactive=False)
            ask.click(image_to_text, [image, question, dseed], [answer])
        with gr.Tab("Editing", visible=info["fine_tuned"]):
            with gr.Row():
                with gr.Column():
                    eimage = gr.Image(label="Image", type="numpy")
                    instruction = gr.Textbox(label="Instruction", placeholder="make the circle green")
                    ecfg = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Instruction guidance")
                    eicfg = gr.Slider(1.0, 5.0, value=1.5, step=0.1, label="Image guidance")
                    en = gr.Slider(1, req_lib.MAX_SAMPLES, value=4, step=1, label="Samples")
                    eseed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    ego = gr.Button("Edit", variant="primary")
                edited = gr.Gallery(label="Edited", columns=4)
            ego.click(edit, [eimage, instruction, ecfg, eicfg, en, eseed], [edited])
    page.queue(default_concurrency_limit=None, max_size=server.config.max_queue)
    return page
