// Swagger UI on this server's own OpenAPI document, nothing loaded from elsewhere: the page's
// Content-Security-Policy forbids inline scripts, so this is the initialiser Swagger UI's
// index.html would carry inline. validatorUrl: null keeps it from fetching a badge from
// swagger.io.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
