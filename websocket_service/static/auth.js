// The page's ?token=... (for a server with AUTH_TOKEN set): sent as a Bearer header on REST
// calls, in INIT for the WebSocket protocol and in the offer on the signaling socket
// (not in its URL, which would land in access logs). Without one, requests go out unchanged.

export const TOKEN = new URLSearchParams(location.search).get("token");

/** fetch() with `Authorization: Bearer <TOKEN>` when the page has a token. */
export function authFetch(url, init = {}) {
  if (!TOKEN) return fetch(url, init);
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${TOKEN}`);
  return fetch(url, { ...init, headers });
}

/** `obj` plus `auth_token` when the page has a token. */
export function withToken(obj) {
  return TOKEN ? { ...obj, auth_token: TOKEN } : obj;
}
