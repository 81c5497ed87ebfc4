mod common;
use common::llama3_tokenizer as llama3;
use llama_webgpu::text::{ChatTemplate, RenderOptions};
use std::time::Instant;

#[test]
fn time_it() {
    let tok = llama3();
    let base = "The quick brown fox jumps over the lazy dog. Numbers 12345 and symbols #@! mixed with Grüße and 天気. ";
    for kb in [4usize, 40, 400, 1600] {
        let text: String = base.repeat(kb * 1024 / base.len());
        let messages: Vec<llama_webgpu::api::ChatMessage> = serde_json::from_value(serde_json::json!([{"role": "user", "content": text}])).unwrap();
        let t = Instant::now();
        let ids = ChatTemplate::llama31().encode(tok, &messages, None, true, &RenderOptions::default()).unwrap();
        eprintln!("{kb} KB: {} tokens in {:?}", ids.len(), t.elapsed());
    }
}
