//! The browser's WebGPU where wgpu does not reach it. Subgroups: wgpu 30's browser backend asks the adapter only for the features of its
//! own table (FEATURES_MAPPING in backend/webgpu.rs), which lacks `subgroups` (gfx-rs/wgpu#5555),
//! so a device it makes never has them. Where the browser offers them with the `subgroup_id`
//! language extension our reduction reads (Chrome 144+, Dawn), the adapter wgpu gets is given a
//! `requestDevice` of its own that adds `subgroups` to what wgpu asks for. wasm-bindgen calls both
//! methods by name on the object, so own properties take the place of the prototype's.

use js_sys::{Array, Function, Object, Promise, Reflect};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};

const SUBGROUPS: &str = "subgroups";

/// `target[key]`, unless undefined or null.
fn get(target: &JsValue, key: &str) -> Option<JsValue> {
    Reflect::get(target, &JsValue::from_str(key)).ok().filter(|value| !value.is_undefined() && !value.is_null())
}

fn method(target: &JsValue, name: &str) -> Option<Function> {
    get(target, name).and_then(|value| value.dyn_into().ok())
}

/// Whether the setlike `set` (GPUSupportedFeatures, WGSLLanguageFeatures) holds `name`.
fn set_has(set: &JsValue, name: &str) -> bool {
    method(set, "has").and_then(|has| has.call1(set, &JsValue::from_str(name)).ok()).is_some_and(|found| found.is_truthy())
}

/// A promise's value from a call that may have thrown: a rejected promise then.
fn promised(called: Result<JsValue, JsValue>) -> JsValue {
    called.unwrap_or_else(|error| Promise::reject(&error).into())
}

/// The browser's `navigator.gpu`, where it has WebGPU.
pub fn navigator_gpu() -> Option<JsValue> {
    get(&js_sys::global(), "navigator").and_then(|navigator| get(&navigator, "gpu"))
}

/// Calls `request_adapter`, which must call `navigator.gpu.requestAdapter` before it returns (as
/// wgpu's `Instance::request_adapter` does), so that the adapter it gets asks for `subgroups` with
/// each device where the browser can run the subgroup reduction. Elsewhere it only calls it.
pub(super) fn with_subgroups_requested<T>(request_adapter: impl FnOnce() -> T) -> T {
    let Some(gpu) = navigator_gpu() else { return request_adapter() };
    let has_subgroup_id = get(&gpu, "wgslLanguageFeatures").is_some_and(|features| set_has(&features, "subgroup_id"));
    let Some(original) = method(&gpu, "requestAdapter").filter(|_| has_subgroup_id) else { return request_adapter() };
    let target = gpu.clone();
    let wrapper = Closure::once_into_js(move |options: JsValue| {
        let adapter = promised(original.call1(&target, &options));
        let Some(then) = method(&adapter, "then") else { return adapter };
        promised(then.call1(&adapter, &Closure::once_into_js(|adapter: JsValue| {
            request_subgroups_with_devices(&adapter);
            adapter
        })))
    });
    let key = JsValue::from_str("requestAdapter");
    let patched = Reflect::set(&gpu, &key, &wrapper).unwrap_or(false);
    let result = request_adapter();
    if patched {
        let _ = Reflect::delete_property(gpu.unchecked_ref::<Object>(), &key);
    }
    result
}

/// Gives `adapter` a `requestDevice` that adds `subgroups` to the required features, where it
/// offers them.
fn request_subgroups_with_devices(adapter: &JsValue) {
    if !get(adapter, "features").is_some_and(|features| set_has(&features, SUBGROUPS)) {
        return;
    }
    let Some(original) = method(adapter, "requestDevice") else { return };
    let target = adapter.clone();
    let request_device = Closure::<dyn FnMut(JsValue) -> JsValue>::new(move |descriptor: JsValue| {
        let descriptor = Object::assign(&Object::new(), descriptor.unchecked_ref());
        let features = get(&descriptor, "requiredFeatures").map(|features| Array::from(&features)).unwrap_or_default();
        features.push(&JsValue::from_str(SUBGROUPS));
        let _ = Reflect::set(&descriptor, &JsValue::from_str("requiredFeatures"), &features);
        promised(original.call1(&target, &descriptor))
    });
    let _ = Reflect::set(adapter, &JsValue::from_str("requestDevice"), &request_device.into_js_value());
}

/// SUBGROUP where `device` was granted `subgroups`.
pub(super) fn granted(device: &wgpu::Device) -> wgpu::Features {
    let granted = device.as_webgpu().and_then(|device| get(device.as_ref(), "features")).is_some_and(|features| set_has(&features, SUBGROUPS));
    if granted { wgpu::Features::SUBGROUP } else { wgpu::Features::empty() }
}
