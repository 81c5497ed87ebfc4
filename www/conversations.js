// Conversations kept in the browser's IndexedDB, one record each:
//   {id, title, created, updated, system, settings: {temperature, top_p, max_tokens, seed},
//    messages: [{role: "user" | "assistant", content, reasoning?, stopped?, figures?}]}
const DATABASE = "llama-webgpu-chat";
const STORE = "conversations";

export const DEFAULT_SETTINGS = { temperature: 0.7, top_p: 0.95, max_tokens: 512, seed: null };

let database = null;

function open() {
  database ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DATABASE, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return database;
}

/** Runs `action` on the store in a transaction; resolves to its request's result once committed. */
async function withStore(mode, action) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const request = action(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = transaction.onabort = () => reject(transaction.error);
  });
}

/** Every conversation, the one changed last first. */
export async function listConversations() {
  const all = await withStore("readonly", (store) => store.getAll());
  return all.sort((a, b) => b.updated - a.updated);
}

export function newConversation() {
  const now = Date.now();
  return { id: crypto.randomUUID(), title: "New chat", created: now, updated: now, system: "", settings: { ...DEFAULT_SETTINGS }, messages: [] };
}

export async function saveConversation(conversation) {
  conversation.updated = Date.now();
  await withStore("readwrite", (store) => store.put(conversation));
}

export async function deleteConversation(id) {
  await withStore("readwrite", (store) => store.delete(id));
}
