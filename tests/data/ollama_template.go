// Renders an Ollama Modelfile TEMPLATE the way Ollama does for a chat request, with Go's own text/template:
// reads {"template", "system", "messages": [{"role", "content"}]} as JSON on stdin, prints the prompt.
// Ollama's steps before rendering, written out: the Modelfile SYSTEM becomes the first message when the request
// has no system message; consecutive messages of one role are merged with a blank line; .System is the text of
// the system messages; .Messages keeps every message (system ones included).
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	var system []string
	var merged []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(merged) > 0 && merged[len(merged)-1].Role == m.Role {
			merged[len(merged)-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	tmpl := template.Must(template.New("").Parse(req.Template))
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": merged}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
