// Small DOM helpers shared by the view's modules (app.js, panels.js). Text goes in with
// textContent, never innerHTML, and a node is written only when its value differs, so an
// unchanged node sees no mutation at all.

export function element(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Set text only when it differs. */
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

export function setAttr(node, name, value) {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
}

export const $ = (id) => document.getElementById(id);
