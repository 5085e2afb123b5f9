// longpoll.js as an ES module: import longpoll, { newClient } from '/js/longpoll.mjs';
// The classic script defines globalThis.longpoll; this file only re-exports it.
import './longpoll.js';

const longpoll = globalThis.longpoll;
export const { newClient, Client, checkOptions, version } = longpoll;
export default longpoll;
