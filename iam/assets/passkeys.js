// Passkeys (WebAuthn): the one script of iam's pages, served from /assets (the pages' CSP: script-src 'self').
//
// A form with data-passkey="create" or "get" works like this on submit: its fields (the CSRF token among them) go
// to the URL in data-options, which answers with the WebAuthn options as JSON (or {"error": "..."}); the browser's
// navigator.credentials.create() / .get() runs with them, and the form is then submitted as a plain form post,
// the credential's JSON in its hidden field "credential". The server verifies it and answers with a page.
"use strict";

(() => {
  const decode = (text) => {
    const base64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    return Uint8Array.from(binary, (ch) => ch.charCodeAt(0)).buffer;
  };
  const encode = (buffer) => {
    const binary = String.fromCharCode(...new Uint8Array(buffer));
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };

  // WebAuthn Level 3 §5.1.10 (toJSON), written out for browsers that lack it.
  const credentialJSON = (credential) => {
    const response = credential.response;
    const json = {
      id: credential.id,
      rawId: encode(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: { clientDataJSON: encode(response.clientDataJSON) },
    };
    if (response.attestationObject) {
      json.response.attestationObject = encode(response.attestationObject);
      json.response.transports = response.getTransports ? response.getTransports() : [];
    } else {
      json.response.authenticatorData = encode(response.authenticatorData);
      json.response.signature = encode(response.signature);
      json.response.userHandle = response.userHandle ? encode(response.userHandle) : null;
    }
    return json;
  };

  const creationOptions = (options) => {
    options.challenge = decode(options.challenge);
    options.user.id = decode(options.user.id);
    (options.excludeCredentials || []).forEach((c) => { c.id = decode(c.id); });
    return options;
  };
  const requestOptions = (options) => {
    options.challenge = decode(options.challenge);
    (options.allowCredentials || []).forEach((c) => { c.id = decode(c.id); });
    return options;
  };

  const ceremony = async (form, show) => {
    if (!window.PublicKeyCredential) {
      show("This browser does not support passkeys.");
      return;
    }
    let options;
    try {
      const answer = await fetch(form.dataset.options, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const body = await answer.json();
      if (!answer.ok) {
        show(body.error || "Something went wrong. Please try again.");
        return;
      }
      options = body;
    } catch (error) {
      show("The server could not be reached. Please try again.");
      return;
    }
    let credential;
    try {
      credential = form.dataset.passkey === "create"
        ? await navigator.credentials.create({ publicKey: creationOptions(options) })
        : await navigator.credentials.get({ publicKey: requestOptions(options) });
    } catch (error) {
      show("No passkey was used. Please try again.");
      return;
    }
    form.elements.credential.value = JSON.stringify(credentialJSON(credential));
    form.submit();
  };

  document.querySelectorAll("form[data-passkey]").forEach((form) => {
    const message = document.getElementById(form.dataset.error);
    const show = (text) => {
      if (message) {
        message.textContent = text;
        message.hidden = false;
      }
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (message) message.hidden = true;
      ceremony(form, show);
    });
  });
})();
