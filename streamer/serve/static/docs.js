// Swagger UI for /docs from the files this server ships (no CDN: offline sites have none), started from this
// file rather than an inline script, which the Content-Security-Policy refuses. Requests it makes ("Try it
// out") carry the session cookie like the console's own.
/* global SwaggerUIBundle */
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null, // the default asks an outside validator service about this document
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
