/* The run editor (#/new): placeholder. */
import { h } from '../util.js';

export function newRunView(root) {
  root.append(h('h1', {}, 'New run'));
  return { async refresh() { return 60000; } };
}
