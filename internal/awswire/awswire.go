// Package awswire writes responses in the AWS JSON 1.1 protocol, as the
// in-process fakes of AWS services (Private CA, KMS) answer the real SDK.
package awswire

import (
	"encoding/json"
	"net/http"
)

// ContentType is the media type of AWS JSON 1.1 bodies.
const ContentType = "application/x-amz-json-1.1"

// Write answers v with status 200. A value that does not marshal is the
// fake's own bug, answered as AWS answers its own faults (InternalFailure),
// so that the client under test fails loudly instead of reading half a body.
func Write(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		Error(w, http.StatusInternalServerError, "InternalFailure", "marshal response: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", ContentType)
	_, _ = w.Write(body) // a client gone mid-body has nothing left to tell
}

// Error answers an AWS error: its type in X-Amzn-ErrorType and in the
// body's __type, which is where the SDK looks for it.
func Error(w http.ResponseWriter, status int, code, msg string) {
	body, err := json.Marshal(struct {
		Type    string `json:"__type"`
		Message string `json:"message"`
	}{code, msg})
	if err != nil { // two strings always marshal; kept so the error is not dropped
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", ContentType)
	w.Header().Set("X-Amzn-ErrorType", code)
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
