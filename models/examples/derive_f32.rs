//! Writes the float graph the GPU engine derives from a bundle's int8 model,
//! for inspection with Netron or a run in ONNX Runtime.
//!
//! `cargo run -p rxvision-models --example derive_f32 -- BUNDLE OUT.onnx`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bundle, out] = args.as_slice() else {
        return Err("usage: derive_f32 BUNDLE OUT.onnx".into());
    };
    let bundle = rxvision_models::bundle::Bundle::load(bundle.as_ref())?;
    let spec = &bundle.manifest.input;
    let graph = rxvision_models::engine::f32_graph::derive(
        bundle.model_bytes(),
        &spec.name,
        [1, 3, spec.height as usize, spec.width as usize],
    )?;
    std::fs::write(out, graph.to_bytes())?;
    println!("wrote {out}");
    Ok(())
}
